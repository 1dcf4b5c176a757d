"""The search answers as the page reads them: each hit with its box and the URLs of its
pictures, naming the index searched (its slides' pictures are looked up there)."""

from __future__ import annotations

import functools
from collections.abc import Collection
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from wsi_ssl.search.results import SearchResult

__all__ = ["answer", "index_query", "region_url"]


def answer(result: SearchResult, retiled: Collection[str] = (), index: str = "") -> dict[str, Any]:
    """``result`` as the page reads it: each hit with its box and the URL of its picture (its
    matched tiles outlined, unless its slide is among ``retiled``: its store's tile numbers
    are no longer the indexed ones), the URLs naming ``index`` (the index searched)."""
    out = result.to_dict()
    q = result.query
    rows = [] if q.tile_numbers is None else [int(r) for r in q.tile_numbers]
    out["query"]["tiles"] = rows
    url = functools.partial(region_url, index=index)
    if q.slide_id is not None:
        out["query"]["image"] = url(str(q.slide_id), q.box, rows, role="query")
    for hit, d in zip(result.hits, out["hits"], strict=True):
        if result.mode == "tiles":
            d["tile_box"] = [hit.x, hit.y, hit.size, hit.size]
            d["box"] = [hit.x - hit.size, hit.y - hit.size, 3 * hit.size, 3 * hit.size]
            rows = [] if hit.slide_id in retiled else [hit.tile]
            d["image"] = url(hit.slide_id, d["box"], rows)
        elif result.mode == "regions":
            rows = [] if hit.slide_id in retiled else list(hit.tiles)
            d["image"] = url(hit.slide_id, hit.box, rows)
        else:
            d["box"] = d.pop("best_box")
            d["image"] = (
                url(hit.slide_id, d["box"], [])
                if d["box"] is not None
                else f"/api/slides/{hit.slide_id}/thumbnail.png{index_query(index, '?')}"
            )
    return out


def region_url(slide_id: str, box: Any, rows: list[int], index: str = "", role: str = "hit") -> str:
    """The region picture of ``box``, ``rows`` outlined in the colour of ``role``."""
    url = f"/api/slides/{slide_id}/region.png?box={','.join(str(int(v)) for v in box)}"
    url += f"&outline={','.join(map(str, rows))}" if rows else ""
    return url + ("&role=query" if role == "query" and rows else "") + index_query(index)


def index_query(index: str, sep: str = "&") -> str:
    """``index`` as a URL query parameter (none when empty)."""
    return f"{sep}index={quote(index, safe='')}" if index else ""
