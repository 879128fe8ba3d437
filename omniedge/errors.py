"""One error type for everything a user can get wrong, so the CLI can print it without a traceback."""

from __future__ import annotations


class OmniedgeError(Exception):
    """A problem the user can fix: says what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return self.problem if not self.fix else f"{self.problem}\n  fix: {self.fix}"
