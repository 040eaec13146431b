"""Engine errors. Plain exceptions with clear one-line messages; the CLI prints them, the platform maps them
to its error envelope. No HTTP here."""

from __future__ import annotations

from glmstack.protocol import PromptTooLongError


class EngineError(Exception):
    """Base for every error the engine raises on bad input (not on bugs)."""


class ModelNotFoundError(EngineError):
    pass


class ModelFileError(EngineError):
    """A checkpoint file is truncated, corrupt or inconsistent. Names the file and what is wrong."""

    def __init__(self, path: object, problem: str, *, field: str | None = None, offset: int | None = None):
        self.path, self.problem, self.field, self.offset = str(path), problem, field, offset
        where = "".join([f" (field {field})" if field else "", f" at byte {offset}" if offset is not None else ""])
        super().__init__(f"{self.path}: {problem}{where}")


class UnsupportedArchitectureError(EngineError):
    pass


class DownloadError(EngineError):
    """`glmstack pull` could not fetch or add a model: the hub refused or could not be reached, the disk is
    full, or the files are not a model glmstack can load. Says what to do next (a token, a retry that resumes)."""


class ContextLengthError(EngineError, PromptTooLongError):
    """The prompt cannot fit into the model's context window even after dropping old history."""

    def __init__(self, prompt_tokens: int, context_length: int, message: str | None = None):
        self.prompt_tokens, self.context_length = prompt_tokens, context_length
        super().__init__(
            message
            or f"prompt is {prompt_tokens} tokens but the model's context window is {context_length} tokens"
        )
