"""What an index of a real release reports beyond the label counts: the test split and
everything of the tree that was not used (folders, files, AU columns), with the reasons."""

from __future__ import annotations

from affpipe.index.layout import Layout


def release_report(layout: Layout, unused_columns: list[dict[str, int]], test: dict, not_lists: list[dict]) -> dict:
    """What of the release was not used (folders, files, columns) and how the test split was made.

    ``unused_columns``: per video, ``"task:column" -> data lines``; ``test``: the
    :meth:`TestRule.resolve` report; ``not_lists``: files named like test lists that are not.
    """
    columns: dict[str, dict[str, int]] = {}
    for per_video in unused_columns:
        for key, rows in per_video.items():
            c = columns.setdefault(key, {"files": 0, "rows": 0})
            c["files"] += 1
            c["rows"] += rows
    unused = [u.describe() for u in layout.unused] + not_lists
    return {"test": test, "unused": unused, "unused_columns": columns}


def release_lines(counts: dict) -> list[str]:
    """Summary lines for the test split and for everything of the tree that was not used."""
    rows = []
    t = counts.get("test")
    if t and (t["videos"] or t["lists"]):
        rows.append(f"test: {t['videos']} videos, {counts['splits'].get('test', 0)} frames; rule: {t['rule']}")
        rows += [f"  list {x['path']} ({x['kind']}, {x['videos']} videos)" for x in t["lists"]]
        for key, what in (("annotated_videos_made_test", "annotated but named by a test list (labels not used)"),
                          ("listed_videos_not_found", "named by a test list, no crops or annotations here"),
                          ("unlisted_videos_without_annotation", "with crops and no annotation, in no test list (test)")):
            if t[key]:
                rows.append(f"  {len(t[key])} video(s) {what}: {', '.join(t[key][:8])}"
                            + (" ..." if len(t[key]) > 8 else ""))
    for key, c in counts.get("unused_columns", {}).items():
        task, name = key.split(":", 1)
        rows.append(f"unused {task.upper()} column {name}: {c['rows']} rows in {c['files']} file(s) "
                    "(not one of the 12 AUs)")
    unused = counts.get("unused", [])
    if unused:
        rows.append(f"not used ({len(unused)}):")
        rows += [f"  {u['path']}: {u['reason']}" for u in unused]
    return rows
