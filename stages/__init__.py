"""Pipeline stages: one module per DVC stage (see dvc.yaml), shared pieces in stages.lib."""
