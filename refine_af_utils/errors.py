"""The project's own errors: one base class, so the runner can tell them from unexpected ones.

Every error the package raises for bad input (params, seed tasks, Super-NI data, a stage folder
made with other settings, a missing model, an unavailable device, a locked run) subclasses
:class:`RefineAFError` as well as the built-in class it has always been (``ValueError``,
``FileNotFoundError``, ``RuntimeError``), so ``except ValueError`` keeps working. Its message is
one line that names the file and the line, or the params key. The runner prints such an error
raised inside a notebook as that one line instead of a traceback.
"""

from __future__ import annotations


class RefineAFError(Exception):
    """Base class of the project's own, expected errors (bad input or state, one-line message)."""


class ParamsError(RefineAFError, ValueError):
    """A params file that does not match the schema (importable from :mod:`refine_af_utils.params` too)."""


class StageConfigError(RefineAFError, RuntimeError):
    """A stage folder whose outputs were made with other settings (rerun the stage with --force)."""


class RunLockedError(RefineAFError, RuntimeError):
    """Another runner holds the run folder's lock."""


class DownloadLimitError(RefineAFError, OSError):
    """A download over its size cap or its total time (one line naming the URL and the limit)."""


class UpstreamNotReadyError(RefineAFError, RuntimeError):
    """``--only`` / ``--from`` asked for a stage whose earlier stages are missing or stale for these params."""


def project_error_names() -> set[str]:
    """Class names of every :class:`RefineAFError` subclass (imports every module of the package, where they
    are defined). The runner matches these against the exception name papermill reports from a notebook.
    """
    import importlib
    import pkgutil

    import refine_af_utils

    for module in pkgutil.walk_packages(refine_af_utils.__path__, "refine_af_utils."):
        if module.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(module.name)
        except ImportError:  # pragma: no cover - a broken optional dependency must not hide the real error
            continue
    names: set[str] = set()
    todo: list[type] = [RefineAFError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def decode_utf8(data: bytes, source: str, error: type[RefineAFError], first_line: int = 1) -> str:
    """``data`` decoded as UTF-8, or ``error`` naming ``source``, the line and the column of the bad byte.

    ``first_line`` is the line number of ``data``'s first line in ``source`` (when it is one line of a file).
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise error(
            f"{source}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from exc
