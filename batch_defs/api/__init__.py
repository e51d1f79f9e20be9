"""The REST API over batch_defs.client (app.py), its typed models (models.py) and its tokens
and quotas (auth.py). Importing the package imports neither FastAPI nor Dagster."""
