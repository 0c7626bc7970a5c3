"""The error tree: every failure a user can cause or meet, each class with its own exit code.

cli.main() is the one place that turns these into a message and an exit status.
"""

from __future__ import annotations


class BuilderError(Exception):
    """A failure meant for a person: the message says what, where, and what to do."""

    exit_code = 1

    def lines(self) -> list[str]:
        return [str(self)]


class MatrixError(BuilderError):
    """The matrix file is malformed or asks for something impossible. Carries every problem at once."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))

    def lines(self) -> list[str]:
        return self.problems


class UsageError(BuilderError):
    """A command-line selector or option that cannot be honoured."""

    exit_code = 2


class EngineError(BuilderError):
    """The Docker engine is unreachable or refused a request."""

    exit_code = 3


class EngineGone(EngineError):
    """The engine stopped answering in the middle of a build or a run (it crashed, or was stopped).

    What the run had made on it cannot be removed now: the next build or certify on that engine removes
    it (builder.engine.Engine.sweep).
    """


class BaseImageError(BuilderError):
    """A base image could not be found, pulled or bootstrapped."""

    exit_code = 4


class SourceError(BuilderError):
    """A build-time package source (CA bundle, index, wheelhouse) is unusable, or a download failed."""

    exit_code = 5


class BuildFailed(BuilderError):
    """One cell's image build failed; carries the tail of its log and where the whole log is."""

    exit_code = 6

    def __init__(self, message: str, log_tail: list[str] | None = None, log_path: str | None = None) -> None:
        self.log_tail = log_tail or []
        self.log_path = log_path
        super().__init__(message)


class Interrupted(BuilderError):
    """Ctrl-C or SIGTERM: work in flight was stopped and cleaned up; finished work was kept."""

    exit_code = 130


class RegistryError(BuilderError):
    """A registry could not be reached, refused a request, or holds something that does not match.

    `retryable` marks a transient failure (a connection reset, a 5xx answer) that a retry may cure.
    """

    exit_code = 7

    def __init__(self, message: str, retryable: bool = False) -> None:
        self.retryable = retryable
        super().__init__(message)


class NotCertified(BuilderError):
    """An image asked to be published or used has no certificate that matches it at the required level."""

    exit_code = 8
