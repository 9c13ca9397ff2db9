"""The serving path: model package, inference engine and the HTTP service (no torch, Lightning or timm)."""
