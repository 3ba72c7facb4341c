"""Team tooling that is not part of the pipeline: a shared MLflow tracking server on PostgreSQL
(`python -m team.server start|stop|status`) and its users (`python -m team.users`)."""


class TeamError(Exception):
    """A problem starting, stopping or using the team server: reported as one clear line."""
