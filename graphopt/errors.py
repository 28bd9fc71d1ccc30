"""Typed errors. Library code raises these; the CLI renders each as one line on stderr.

Every message should end with what the user can do about it.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Base of every error graphopt raises on purpose."""

    exit_code = 2


class ModelNotFoundError(GraphoptError):
    """The model path does not exist or is not a file."""


class ModelFormatError(GraphoptError):
    """The file is not an ONNX model, or is truncated/corrupt."""


class ExternalDataError(GraphoptError):
    """External tensor data is missing or unreadable."""


class UnsafePathError(ExternalDataError):
    """An external-data location points outside the model's folder."""


class UnsupportedModelError(GraphoptError):
    """An opset, IR version or op graphopt cannot handle."""


class ConfigError(GraphoptError):
    """A pass option, recipe or CLI option is wrong (unknown, mistyped, out of range)."""


def check_known(given, known, message: str) -> None:
    """``ConfigError`` when ``given`` names something ``known`` does not have: ``message``
    formats ``{unknown}`` (those names) and ``{known}`` (every known name) to one line."""
    known = list(known)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(message.format(unknown=", ".join(unknown), known=", ".join(known)))


class InputSpecError(GraphoptError):
    """An --input-shape, calibration or inputs file does not fit the model."""


class ProviderError(GraphoptError):
    """A requested execution provider is not available."""


class ExportError(GraphoptError):
    """Exporting a framework model to ONNX failed, or the export disagrees with the framework."""


class PassError(GraphoptError):
    """A pass broke an invariant or failed verification, and was rolled back: exit code 1,
    or 2 (``user_error``) when the cause was the user's config or input.

    Carries the pass name and the passes that ran before it, so a user can reproduce it.
    """

    exit_code = 1

    def __init__(self, pass_name: str, message: str, before: tuple[str, ...] = (), *,
                 user_error: bool = False):
        if user_error:
            self.exit_code = 2
        self.pass_name = pass_name
        self.before = tuple(before)
        after = f" (after {', '.join(before)})" if before else ""
        super().__init__(f"pass '{pass_name}'{after}: {message}")
