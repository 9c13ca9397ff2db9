"""PlantVillage data: download, validate, deduplicate, group, split, transform and load.

Stage entry points: :func:`leaflens.data.download.download` and :func:`leaflens.data.prepare.prepare`.
"""
