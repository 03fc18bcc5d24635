"""What a launch of a published resource starts on the chosen host (``launch_ok``'s program).

An application starts its ``command`` with ``arguments`` in ``working_dir``; a document is its
``target`` file given to the program of the application it names (or its own ``command``, or
the host's opener); a folder is its ``target`` given to its ``command`` (or the host's file
manager); a desktop starts nothing. ``start`` says how the chosen host starts it: the alternate
shell (xrdp) or RemoteApp (Windows), as its agent registered it. Only what is published here
can be started: the broker answers a launch of anything else with ``NOT_FOUND``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypedDict

from ras.broker.model import ResourceKind, ResourceRecord
from ras.protocol import AppStart

__all__ = ["ProgramFields", "program_fields"]


class ProgramFields(TypedDict, total=False):
    """Keyword arguments of :class:`ras.protocol.LaunchOk`."""

    command: str
    arguments: str
    working_dir: str
    target: str
    start: str
    single_sign_on: bool


def program_fields(
    resource: ResourceRecord, published: Iterable[ResourceRecord], start: AppStart
) -> ProgramFields:
    """The optional fields of ``launch_ok`` for ``resource`` on a host that starts programs
    the ``start`` way; ``published``: every resource (a document's application is one)."""
    fields = ProgramFields(single_sign_on=resource.single_sign_on)
    match resource.kind:
        case ResourceKind.APPLICATION:
            fields |= ProgramFields(
                command=resource.command,
                arguments=resource.arguments,
                working_dir=resource.working_dir,
            )
        case ResourceKind.DOCUMENT:
            wanted = resource.application.casefold()
            app = None
            if wanted:
                app = next((r for r in published if r.id.casefold() == wanted), None)
            fields |= ProgramFields(
                command=app.command if app is not None else resource.command,
                arguments=app.arguments if app is not None else resource.arguments,
                working_dir=resource.working_dir,
                target=resource.target,
            )
        case ResourceKind.FOLDER:
            fields |= ProgramFields(
                command=resource.command,
                arguments=resource.arguments,
                target=resource.target,
                working_dir=resource.working_dir,
            )
        case _:
            return fields  # a desktop
    fields["start"] = str(start)
    return fields
