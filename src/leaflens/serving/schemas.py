"""Response models of the HTTP API: the OpenAPI schema built from them is the contract with clients."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Diagnosis(BaseModel):
    """One candidate class with its calibrated probability."""

    class_id: int = Field(description="Index of the class in the package's labels.json.")
    name: str = Field(description='Class name, "Crop___Disease".', examples=["Tomato___Late_blight"])
    display_name: str = Field(examples=["Tomato — Late blight"])
    crop: str = Field(examples=["Tomato"])
    disease: str = Field(description='Disease name; "healthy" for healthy leaves.', examples=["Late blight"])
    healthy: bool
    probability: float = Field(
        ge=0.0, le=1.0, description="Calibrated probability (temperature-scaled softmax)."
    )


class Prediction(BaseModel):
    """The diagnosis of one image."""

    filename: str | None = Field(default=None, description="Name of the uploaded file, as sent.")
    top_k: list[Diagnosis] = Field(description="Most likely classes, most probable first.")
    not_sure: bool = Field(
        description='The model abstains ("not sure"): the top probability is under the package\'s threshold, '
        "e.g. for a blurry photo or something that is not a leaf."
    )
    abstain_threshold: float | None = Field(default=None, description="The threshold the abstain rule used.")
    model_version: str
    inference_ms: float = Field(description="Time spent in the inference engine for this image's batch.")
    width: int = Field(description="Width of the decoded image in pixels (after EXIF rotation).")
    height: int = Field(description="Height of the decoded image in pixels (after EXIF rotation).")
    explanation: str | None = Field(
        default=None, description="Grad-CAM overlay as a PNG data URL, when asked for with ?explain=true."
    )
    explanation_error: str | None = Field(default=None, description="Why no explanation could be made.")


class ErrorDetail(BaseModel):
    code: str = Field(
        description="Machine-readable reason: empty, not_an_image, corrupt, too_large, too_small, "
        "file_too_large, missing_file, too_many_files, invalid_request, not_ready, ...",
        examples=["not_an_image"],
    )
    message: str = Field(description="What was wrong, for a person.")
    filename: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer of the API has this shape."""

    error: ErrorDetail


class BatchItem(BaseModel):
    """One file of a batch: either its prediction or the error that stopped it (never both)."""

    filename: str | None = None
    prediction: Prediction | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem] = Field(description="One entry per uploaded file, in upload order.")
    succeeded: int
    failed: int


class LabelInfo(BaseModel):
    id: int
    name: str
    display_name: str
    crop: str
    disease: str
    healthy: bool


class ModelInfo(BaseModel):
    """What is being served."""

    version: str
    arch: str | None = None
    num_classes: int
    labels: list[LabelInfo]
    preprocessing: dict[str, Any] = Field(description="preprocess.json of the package.")
    calibration: dict[str, Any] = Field(description="calibration.json: temperature and abstain rule.")
    metrics: dict[str, Any] = Field(description="metrics.json of the package (evaluation on the test split).")
    package_sha256: str = Field(description="sha256 of the package's manifest.json (identifies the package).")
    files: dict[str, str] = Field(
        description="sha256 of every file of the package, as verified at load time."
    )
    load_seconds: float
    loaded_at: str = Field(description="UTC time the package was loaded, ISO 8601.")
    max_batch_size: int
    max_wait_ms: float
    explain_available: bool = Field(
        description="Whether ?explain=true can work here: the package has weights.safetensors and torch, "
        "timm and grad-cam are installed (the slim API image leaves them out)."
    )


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    ready: bool
    model_version: str | None = None
