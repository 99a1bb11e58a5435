"""The dashboard: static pages and assets shipped inside the package (service/api/static),
served by the same app. The pages hold no data: their scripts call the /v1 API with the key the
user entered (kept in the browser's localStorage, sent as the Bearer header)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from service.errors import NotFound
from service.storage.files import UnsafePathError, safe_join

STATIC = Path(__file__).resolve().parent.parent / "static"
MEDIA = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".txt": "text/plain", ".png": "image/png"}
router = APIRouter(prefix="/ui", include_in_schema=False)


def _page(name: str) -> FileResponse:
    # Pages change with the package version only; revalidate so an upgrade shows at once.
    return FileResponse(STATIC / name, media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("")
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.get("/")
def dataset_list_page() -> FileResponse:
    return _page("index.html")


@router.get("/datasets/{dataset_id}")
def dataset_page(dataset_id: str) -> FileResponse:
    return _page("dataset.html")


@router.get("/datasets/{dataset_id}/samples/{sample_id:path}")
def sample_page(dataset_id: str, sample_id: str) -> FileResponse:
    return _page("sample.html")


@router.get("/static/{name:path}")
def asset(name: str) -> FileResponse:
    try:
        path = safe_join(STATIC, name)
    except UnsafePathError:
        raise NotFound("asset") from None
    if not path.is_file() or path.suffix not in MEDIA:
        raise NotFound("asset")
    return FileResponse(path, media_type=MEDIA[path.suffix], headers={"Cache-Control": "public, max-age=3600"})
