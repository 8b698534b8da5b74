"""Prefect flows: thin orchestration around the rapidin library and the tasks package."""

import logging

from rapidin.errors import RapidInError


class _OneLineUserErrors(logging.Filter):
    """A RapidInError is the user's input (a wrong version, a bad option): Prefect's run log gets its one line, not a
    traceback of our code (Prefect logs every failure with exc_info)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], RapidInError):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    if not any(isinstance(f, _OneLineUserErrors) for f in logging.getLogger(_name).filters):
        logging.getLogger(_name).addFilter(_OneLineUserErrors())
