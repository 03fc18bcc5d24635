"""The portal's pages: the HTML templates in ``templates/`` filled with escaped values.

Templates are plain HTML with ``$name`` placeholders (``string.Template``). Every value is
HTML-escaped here; only fragments this module built itself (``Html``) go in unescaped. There
is no inline script or style anywhere (the Content-Security-Policy forbids both): behaviour is
in ``static/portal.js``, looks in ``static/portal.css``.
"""

from __future__ import annotations

import functools
import html
import string
from collections.abc import Collection, Iterable
from importlib import resources

from ras.portal.settings import LaunchMethod, PortalSettings
from ras.protocol import Resource, ResourceKind

__all__ = [
    "KIND_LABELS",
    "METHOD_LABELS",
    "Html",
    "challenge_page",
    "login_page",
    "message_page",
    "offered_methods",
    "resources_page",
]

KIND_LABELS = {
    ResourceKind.DESKTOP: "Desktop",
    ResourceKind.APPLICATION: "Application",
    ResourceKind.DOCUMENT: "Document",
    ResourceKind.FOLDER: "Folder",
}
METHOD_LABELS = {"browser": "Open in browser", "native": "Download .rdp file"}


class Html(str):
    """A fragment built here from escaped parts: inserted as it is."""

    __slots__ = ()


@functools.cache
def _template(name: str) -> string.Template:
    text = resources.files("ras.portal").joinpath("templates", name).read_text("utf-8")
    return string.Template(text)


def _fill(template: str, /, **values: object) -> Html:
    safe = {
        k: v if isinstance(v, Html) else html.escape(str(v), quote=True) for k, v in values.items()
    }
    return Html(_template(template).substitute(safe))


def _notice(text: str, *, error: bool = True) -> Html:
    if not text:
        return Html("")
    kind = "notice error" if error else "notice"
    role = "alert" if error else "status"
    return Html(f'<p class="{kind}" role="{role}">{html.escape(text)}</p>')


def _page(title: str, body: Html, *, farm: str, user: str = "", csrf: str = "") -> bytes:
    account = Html("")
    if user:
        account = Html(
            '<form method="post" action="/logout" id="logout-form">'
            f'<span class="who">{html.escape(user)}</span>'
            f'<input type="hidden" name="csrf" value="{html.escape(csrf)}">'
            '<button type="submit">Log out</button></form>'
        )
    return _fill("layout.html", title=title, farm=farm, account=account, body=body).encode()


def login_page(
    *, farm: str, csrf: str, settings: PortalSettings, notice: str = "", username: str = ""
) -> bytes:
    body = _fill(
        "login.html",
        notice=_notice(notice),
        csrf=csrf,
        ip_url=settings.client_ip_detection_url,
        username=username,
    )
    return _page("Log in", body, farm=farm)


def challenge_page(
    *, farm: str, csrf: str, pending: str, prompt: str, echo: bool, notice: str = ""
) -> bytes:
    body = _fill(
        "challenge.html",
        notice=_notice(notice),
        csrf=csrf,
        pending=pending,
        prompt=prompt,
        input_type="text" if echo else "password",
        input_mode="numeric" if echo else "text",
    )
    return _page("Verification", body, farm=farm)


def offered_methods(
    settings: PortalSettings, available: Collection[str] = ("browser", "native")
) -> tuple[str, ...]:
    """The launch methods the page offers, the primary first: what the settings say, of what
    this gateway can do (``available``: "native" needs its RDP port, "browser" the web
    client)."""
    wanted: tuple[str, ...]
    if settings.allow_user_select:
        both = ("browser", "native")
        wanted = both if settings.launch_method is LaunchMethod.BROWSER else both[::-1]
    else:
        wanted = {
            LaunchMethod.BROWSER: ("browser",),
            LaunchMethod.NATIVE: ("native",),
            LaunchMethod.NATIVE_FALLBACK: ("native", "browser"),
        }[settings.launch_method]
    return tuple(m for m in wanted if m in available)


def _actions(
    resource: Resource, settings: PortalSettings, csrf: str, offered: tuple[str, ...]
) -> Html:
    forms = []
    for i, method in enumerate(offered):
        new_tab = method == "browser" and settings.open_in_new_tab
        target = ' target="_blank"' if new_tab else ""
        label = METHOD_LABELS[method]
        name = html.escape(resource.name)
        forms.append(
            f'        <form method="post" action="/launch"{target}>'
            f'<input type="hidden" name="csrf" value="{html.escape(csrf)}">'
            f'<input type="hidden" name="resource" value="{html.escape(resource.id)}">'
            f'<input type="hidden" name="method" value="{method}">'
            f'<button type="submit" data-method="{method}"'
            f"{' class=primary' if i == 0 else ''}"
            f' aria-label="{html.escape(label)}: {name}">{html.escape(label)}</button></form>'
        )
    return Html("\n".join(forms))


def _chooser(settings: PortalSettings, offered: tuple[str, ...]) -> Html:
    if not settings.allow_user_select or len(offered) < 2:  # nothing to choose
        return Html("")
    first = offered[0]
    radios = "".join(
        f'<input type="radio" name="launch-method" id="launch-{m}" value="{m}"'
        f'{" checked" if m == first else ""}><label for="launch-{m}">'
        f"{'In the browser' if m == 'browser' else 'With my RDP client (.rdp file)'}</label>"
        for m in ("browser", "native")
    )
    return Html(
        '<fieldset class="chooser" id="launch-chooser"><legend>Open resources</legend>'
        f"{radios}</fieldset>"
    )


def resources_page(
    *,
    farm: str,
    user: str,
    csrf: str,
    resources: Iterable[Resource],
    settings: PortalSettings,
    available: Collection[str] = ("browser", "native"),
    notice: str = "",
) -> bytes:
    offered = offered_methods(settings, available)
    if not offered:
        notice = notice or "Launching is not available on this gateway."
    items = [
        _fill(
            "resource.html",
            id=r.id,
            kind=r.kind.value,
            name=r.name,
            kind_label=KIND_LABELS.get(r.kind, r.kind.value),
            actions=_actions(r, settings, csrf, offered),
        )
        for r in resources
    ]
    listed = Html("".join(items)) or Html(
        '    <li class="empty">Nothing is published to you yet.</li>'
    )
    body = _fill(
        "resources.html", notice=_notice(notice), chooser=_chooser(settings, offered), items=listed
    )
    return _page("Resources", body, farm=farm, user=user, csrf=csrf)


def message_page(
    *, farm: str, heading: str, text: str, link: str = "/", link_text: str = "Back"
) -> bytes:
    body = _fill("message.html", heading=heading, text=text, link=link, link_text=link_text)
    return _page(heading, body, farm=farm)
