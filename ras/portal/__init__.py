"""The User Portal: log in from a browser, see the published resources, launch one natively
(an .rdp file for the gateway's RDP port) or in the browser (the web client). Served by a
normal gateway on its TLS port (docs/portal.md)."""

from ras.portal.app import Portal, PortalSite, WebLaunch
from ras.portal.server import serve_portal
from ras.portal.sessions import WebSession
from ras.portal.settings import DEFAULT, LaunchMethod, PortalSettings

__all__ = [
    "DEFAULT",
    "LaunchMethod",
    "Portal",
    "PortalSettings",
    "PortalSite",
    "WebLaunch",
    "WebSession",
    "serve_portal",
]
