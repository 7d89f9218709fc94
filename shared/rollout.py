"""Model rollout: promote a published version, roll back to the one before, compare two versions' tags.

The active version lives in two places that move together: the Milvus alias ``lm_active`` (what workers
follow, read once per batch) and ``model_versions.is_active`` (what the album views follow). Promote and
rollback (and ``landmarks publish``, through ``activate``) swap the alias first, then the row, under
``activation_lock`` so that two operators cannot interleave them; re-running the same command repairs a
half-done swap (``landmarks health`` reports a disagreement).

Every activation lands in ``model_activations`` through a database trigger, whichever path made it
(``landmarks publish`` included). ``rollback`` replays that history as a stack: promote pushes, rollback
pops, so rolling back twice from C (after A → B → C) gives B, then A.

A shadow (``landmarks publish MODEL --shadow``) is a published, inactive version that workers run beside
the active one on a sampled share of photos, writing its tags under its own version (the album views
never show them) so that ``compare`` can judge it on live traffic. It lives in ``shadow_rollouts``;
promoting it ends it.
"""

from __future__ import annotations

import getpass
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import RowMapping, Text, func, select, text
from sqlalchemy import bindparam as sa_bindparam
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from shared.db.models import ModelActivation, ModelVersion, Photo, ShadowPhoto, ShadowRollout
from shared.db.session import session_lock, transaction
from shared.db.writer import (
    activate_model_version,
    active_model_version,
    running_shadow,
    start_shadow_rollout,
    stop_shadow_rollout,
)
from shared.index import LandmarkIndex, sanitize_version

log = logging.getLogger(__name__)

# The two keys of the session-level advisory lock that activations hold (see activation_lock). Two keys: a key
# space apart from the one-key transaction lock (ACTIVATE_LOCK) that the PostgreSQL step of an activation takes
# from another connection inside it, which would otherwise wait for this one forever.
ACTIVATION_LOCK = ("landmarks.rollout", "activation")
CATCH_UP = "landmarks backfill --all"


class RolloutError(RuntimeError):
    """The requested promotion or rollback cannot be done; the message says why and what to do."""


@dataclass
class Activation:
    version: str
    previous: str | None
    action: str
    changed: bool
    # Photos that were in the albums before and that the new version has not been through: out of the albums
    # until ``backfill`` (the command that sends them to it; None when there are none) has run.
    uncovered: int | None = 0  # None: not counted (a rollback)
    backfill: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "previous": self.previous, "action": self.action, "changed": self.changed,
                "uncovered": self.uncovered, "backfill": self.backfill}


def actor() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - no user name in some containers
        return socket.gethostname()


def _active(engine: Engine) -> str | None:
    with transaction(engine) as session:
        row = active_model_version(session)
        return row.version if row else None


def _require_published(version: str, index: LandmarkIndex) -> None:
    # Complete only: the leftovers of an interrupted publish must never be served.
    if not index.is_published(version):
        raise RolloutError(f"model version {version!r} has no collections in Milvus, or only those of an "
                           "interrupted publish: `landmarks publish MODEL` again")


@contextmanager
def activation_lock(engine: Engine) -> Iterator[None]:
    """Holds the right to change the active version for the block: wrap everything from reading the active
    version to the alias swap and the PostgreSQL step, so that two activations (promote, rollback, publish)
    run one after the other instead of leaving workers on one version and albums on the other. Another
    activation waits for the block to end. Session-level: the PostgreSQL step commits inside the block."""
    key = tuple(func.hashtext(part) for part in ACTIVATION_LOCK)
    with session_lock(engine, key, "the activation lock", on_wait=_say_waiting):
        yield


def _say_waiting() -> None:
    log.info("another promote, rollback or publish is changing the active version: waiting for it")


def activate(version: str, engine: Engine, index: LandmarkIndex, *, action: str = "promote",
             who: str | None = None, require_coverage: bool = False, require_model_file: bool = True) -> Activation:
    """Make an already published version active (Milvus alias, then PostgreSQL), recording ``action``;
    with ``require_coverage``, only once every photo in the albums has been through it; with
    ``require_model_file``, only if its model file can be read here."""
    with activation_lock(engine):
        return _activate_holding_lock(version, engine, index, action=action, who=who,
                                      require_coverage=require_coverage, require_model_file=require_model_file)


def _activate_holding_lock(version: str, engine: Engine, index: LandmarkIndex, *, action: str, who: str | None,
                           require_coverage: bool, require_model_file: bool) -> Activation:
    with transaction(engine) as session:
        row = session.get(ModelVersion, version)
        if row is None:
            raise RolloutError(f"model version {version!r} is not registered: `landmarks publish MODEL` first")
        checkpoint = row.checkpoint
    _require_published(version, index)
    previous = _active(engine)
    alias = index.active_version()
    if previous == version and alias == version:
        return Activation(version, previous, action, changed=False)
    if require_model_file:
        _require_model_file(version, checkpoint, action)
    # Counted before the swap, while the albums are still previous's; not for a rollback, which must not wait
    # for a scan of the albums (it may leave photos uploaded meanwhile out: the backfill sends them).
    uncovered = None if action == "rollback" else uncovered_photos(version, engine)
    if require_coverage and uncovered:
        raise RolloutError(_uncovered_message(uncovered, version))
    # --all sends exactly the photos the version has not been through, whatever their upload time.
    backfill = CATCH_UP if uncovered or action == "rollback" else None
    with alias_restored_on_failure(version, index):
        with transaction(engine) as session:
            session.execute(select(func.set_config("landmarks.activation_action", action, True)))
            session.execute(select(func.set_config("landmarks.activation_actor", who or actor(), True)))
            activate_model_version(session, version)
            ended = stop_shadow_rollout(session, reason="promoted", version=version)
    if ended is not None:
        log.info("%s: the shadow of %s ends with its activation", action, version, extra={"model_version": version})
    log.info("%s: model %s is active (was %s)", action, version, previous, extra={"model_version": version})
    return Activation(version, previous, action, changed=True, uncovered=uncovered, backfill=backfill)


def _require_model_file(version: str, checkpoint: str, action: str) -> None:
    """Workers load the version's file as soon as the alias moves: one they cannot read stalls the whole fleet
    (every batch handed back) until it is there. Checked as `landmarks health` checks it, from this node only."""
    from shared.health import unreadable_model_file
    path = unreadable_model_file(checkpoint)
    if path is None:
        return
    forced = "landmarks rollback --force" if action == "rollback" else f"landmarks promote {version} --force"
    raise RolloutError(f"the model file {path} of {version} is missing or unreadable here: workers would fail "
                       f"every batch once it is active. It must be readable where the workers run; if it is there "
                       f"(another node, another mount), `{forced}`")


@contextmanager
def alias_restored_on_failure(version: str, index: LandmarkIndex) -> Iterator[None]:
    """The Milvus alias moved to ``version`` for the PostgreSQL step run inside; if that step fails, the alias is
    pointed back where it was before raising, so that workers and albums stay on the same version (on a first
    activation it is removed: workers would otherwise tag under a version that PostgreSQL never activated)."""
    previous = index.active_version()
    index.activate(version)
    try:
        yield
    except Exception:
        if previous != sanitize_version(version):
            _point_alias_back(previous, version, index)
        raise


def _point_alias_back(previous: str | None, version: str, index: LandmarkIndex) -> None:
    undo = f"put back on {previous}" if previous else "removed (this was the first activation)"
    try:
        index.activate(previous) if previous is not None else index.deactivate()
    except Exception:  # noqa: BLE001 - the PostgreSQL error is the one to raise; this one is logged
        log.exception("activating %s failed in PostgreSQL, and the Milvus alias could not be %s: "
                      "workers follow %s, albums do not; `landmarks promote %s --force` puts them together",
                      version, undo, version, previous or version, extra={"model_version": version})
        return
    log.warning("activating %s failed in PostgreSQL: the Milvus alias was %s", version, undo,
                extra={"model_version": version})


def promote(version: str, engine: Engine, index: LandmarkIndex, who: str | None = None, *,
            force: bool = False) -> Activation:
    """Activate ``version``; refused (unless ``force``) while photos in the albums have not been through it, or
    while its model file cannot be read here."""
    return activate(version, engine, index, action="promote", who=who, require_coverage=not force,
                    require_model_file=not force)


# Photos in the active version's albums (not deleted, with a tag of it) that ``candidate`` has not processed (live
# or as a shadow): the album views show only the active version's tags, so promoting takes them out of the albums
# until it tags them. Exact, so it reads every photo and tag once (promote runs it holding the activation lock):
# asked of each photo as existence tests, which PostgreSQL runs as parallel hash semi- and anti-joins, instead
# of counting distinct photos over every tag (half the time at 3.5 M tags).
UNCOVERED_SQL = """
SELECT count(*)
FROM photos p
WHERE p.status <> 'deleted' AND p.model_version IS DISTINCT FROM :candidate
  AND EXISTS (SELECT 1 FROM photo_tags t
              WHERE t.user_id = p.user_id AND t.photo_id = p.photo_id
                AND t.model_version = (SELECT version FROM model_versions WHERE is_active AND version <> :candidate))
  AND NOT EXISTS (SELECT 1 FROM shadow_photos s
                  WHERE s.user_id = p.user_id AND s.photo_id = p.photo_id AND s.model_version = :candidate)
  AND NOT EXISTS (SELECT 1 FROM photo_tags c
                  WHERE c.user_id = p.user_id AND c.photo_id = p.photo_id AND c.model_version = :candidate)
"""


def uncovered_photos(candidate: str, engine: Engine) -> int:
    """Photos in the active version's albums that ``candidate`` has not processed."""
    with transaction(engine) as session:
        return session.scalar(text(UNCOVERED_SQL), {"candidate": candidate})


def _uncovered_message(uncovered: int, candidate: str) -> str:
    return (f"{uncovered} photos in users' albums have not been through {candidate}: promoting it now takes them "
            f"out of the albums until it tags them. Tag them first (`landmarks shadow start {candidate} --share 1`, "
            f"then `landmarks backfill --all --include-current`), or `landmarks promote {candidate} --force` and "
            "run the backfill it prints")


def history(engine: Engine, limit: int | None = None) -> list[dict[str, Any]]:
    """Activations, oldest first (the last ``limit`` only, given one)."""
    table = ModelActivation.__table__
    query = select(table).order_by(table.c.id)
    with transaction(engine) as session:
        rows = [dict(r) for r in session.execute(query).mappings()]
    return rows[max(len(rows) - limit, 0):] if limit is not None else rows


def rollout_stack(rows: list[dict[str, Any]], active: str | None) -> list[str]:
    """The versions a rollback walks back through, most recent last (see the module's docstring)."""
    stack: list[str] = []
    for row in rows:
        version = row["version"]
        if row["action"] == "rollback" and len(stack) >= 2 and stack[-2] == version:
            stack.pop()
        elif not stack or stack[-1] != version:
            stack.append(version)
    if active is not None and (not stack or stack[-1] != active):
        stack.append(active)  # activated outside the recorded history (e.g. before migration 0002)
    return stack


def rollback_target(engine: Engine) -> tuple[str | None, str]:
    active = _active(engine)
    stack = rollout_stack(history(engine), active)
    if active is None:
        raise RolloutError("no active model version: nothing to roll back")
    if len(stack) < 2:
        raise RolloutError(f"{active} is the first version on record: nothing to roll back to "
                           "(`landmarks promote V` activates any published version)")
    return stack[-2], active


def rollback(engine: Engine, index: LandmarkIndex, who: str | None = None, *, force: bool = False) -> Activation:
    """Back to the version before the active one; refused (unless ``force``) while its model file cannot be
    read here."""
    with activation_lock(engine):  # the target is read from the history this rollback then extends
        _require_whole_swap(engine, index)
        target, _ = rollback_target(engine)
        return _activate_holding_lock(target, engine, index, action="rollback", who=who, require_coverage=False,
                                      require_model_file=not force)


def _require_whole_swap(engine: Engine, index: LandmarkIndex) -> None:
    """A promote that moved the alias but not the albums' version leaves workers on the new version while
    the history ends at the old one: a rollback from there would go back two versions."""
    albums, serving = _active(engine), index.active_version()  # the alias names the version sanitised
    if serving is not None and albums is not None and serving != sanitize_version(albums):
        raise RolloutError(f"a half-done swap: workers follow {serving} (Milvus) while the albums show {albums} "
                           f"(PostgreSQL). `landmarks promote {albums} --force` puts the workers back on {albums}; "
                           f"`landmarks promote {serving} --force` finishes the swap")


# Photos with tags of each version, from photo_tags's primary key (user_id, photo_id, model_version, landmark_id)
# alone: an index-only scan meets each photo's versions side by side, where counting distinct photos per version
# sorted every tag (a few times faster at 3.5 M tags, but still a read of every tag: hence only on request).
TAGGED_PHOTOS_SQL = """
SELECT model_version, count(*)
FROM (SELECT DISTINCT user_id, photo_id, model_version FROM photo_tags) AS tagged
GROUP BY model_version
"""


def versions(engine: Engine, index: LandmarkIndex | None = None, *, counts: bool = False) -> list[dict[str, Any]]:
    """Registered versions, oldest first, with their shadow run if one is running and whether Milvus has them
    (given ``index``). ``tagged_photos`` and ``shadow_photos`` read every tag and shadow verdict (seconds per
    million): counted only with ``counts``, None otherwise.

    Given ``index``, each row says whether it is ``milvus_only``: after it, the versions Milvus holds and
    PostgreSQL has no row of (PostgreSQL restored from a backup older than their publish), by name, with
    nothing PostgreSQL would know (created_at, backbone, checkpoint: None), so they can be found and published
    again from their files."""
    table = ModelVersion.__table__
    in_milvus = set(index.versions()) if index is not None else None
    with transaction(engine) as session:
        rows = session.execute(select(table.c.version, table.c.created_at, table.c.is_active, table.c.backbone,
                                      table.c.checkpoint).order_by(table.c.created_at)).mappings().all()
        tagged, shadowed = _photos_per_version(session) if counts else ({}, {})
        shadow = running_shadow(session)
    out = []
    for row in rows:
        item = dict(row)
        item["tagged_photos"] = tagged.get(row["version"], 0) if counts else None
        item["shadow_photos"] = shadowed.get(row["version"], 0) if counts else None
        item["shadow"] = _shadow_dict(shadow) if shadow is not None and shadow.version == row["version"] else None
        if in_milvus is not None:
            item["in_milvus"] = row["version"] in in_milvus
            item["milvus_only"] = False
        out.append(item)
    if in_milvus is None:
        return out
    unregistered = sorted(in_milvus - {row["version"] for row in rows})
    return out + [_milvus_only_row(version, tagged.get(version, 0) if counts else None,
                                   shadowed.get(version, 0) if counts else None) for version in unregistered]


def _milvus_only_row(version: str, tagged_photos: int | None, shadow_photos: int | None) -> dict[str, Any]:
    """A version Milvus holds and PostgreSQL does not: what PostgreSQL would have recorded is None."""
    return {"version": version, "created_at": None, "is_active": False, "backbone": None, "checkpoint": None,
            "tagged_photos": tagged_photos, "shadow_photos": shadow_photos, "shadow": None, "in_milvus": True,
            "milvus_only": True}


def milvus_only_versions(engine: Engine, index: LandmarkIndex) -> list[str]:
    """Versions completely published in Milvus that PostgreSQL has no row of, sorted."""
    with transaction(engine) as session:
        registered = set(session.scalars(select(ModelVersion.version)))
    return sorted(set(index.versions()) - registered)


def _photos_per_version(session: Session) -> tuple[dict[str, int], dict[str, int]]:
    """Photos each version has tagged, and photos each has processed as a shadow."""
    tagged = dict(session.execute(text(TAGGED_PHOTOS_SQL)).all())
    shadowed = dict(session.execute(select(ShadowPhoto.model_version, func.count())
                                    .group_by(ShadowPhoto.model_version)).all())
    return tagged, shadowed


# --- compare -------------------------------------------------------------------------------------

# The baseline's terms as the active version, each from its activation to the next one (open while it is
# active): it has also seen every photo uploaded in one, since its "no landmark" verdict leaves no trace once
# another version re-tags the photo. Photos uploaded while it was not active it has not seen.
A_TERMS = """
    SELECT since, until FROM (
        SELECT version, activated_at AS since, lead(activated_at, 1, 'infinity') OVER (ORDER BY id) AS until
        FROM model_activations
    ) AS terms
    WHERE version = :a
"""
# One row per (photo, landmark) that either version tagged. MATERIALIZED: inlined, the planner walks
# photo_tags in primary-key order, reading its heap at random (three times slower on millions of tags).
PAIRS = """
    SELECT user_id, photo_id, landmark_id,
           bool_or(model_version = :a) AS in_a, bool_or(model_version = :b) AS in_b,
           bool_or(model_version = :a AND rank = 0) AS best_of_a, bool_or(model_version = :b AND rank = 0) AS best_of_b
    FROM photo_tags
    WHERE model_version IN (:a, :b) AND (:user IS NULL OR user_id = :user)
    GROUP BY user_id, photo_id, landmark_id
"""
# One row per photo with tags: what each version tagged, its best landmarks, and the landmarks one version
# gave and not the other (arrays of a photo's few landmarks, so that no second pass over the pairs is needed).
PHOTO_TAGS = """
    SELECT user_id, photo_id, bool_or(in_a) AS tagged_a, bool_or(in_b) AS tagged_b,
           min(landmark_id) FILTER (WHERE best_of_a) AS top_a, min(landmark_id) FILTER (WHERE best_of_b) AS top_b,
           count(*) FILTER (WHERE in_a AND in_b) AS tags_both,
           array_agg(landmark_id) FILTER (WHERE in_b AND NOT in_a) AS gained,
           array_agg(landmark_id) FILTER (WHERE in_a AND NOT in_b) AS lost
    FROM pairs
    GROUP BY user_id, photo_id
"""
# Whether a version has processed a photo: it tagged it, its verdict is the latest, or it shadowed it (including
# the photos it found no landmark on).
PROCESSED = """(t.tagged_{v} OR p.model_version IS NOT DISTINCT FROM :{v}
            OR EXISTS (SELECT 1 FROM shadow_photos s
                       WHERE s.user_id = t.user_id AND s.photo_id = t.photo_id AND s.model_version = :{v}))"""
# The photos that are not deleted, with whether each version has seen them (see compare's docstring).
JUDGED = f"""
    SELECT t.*, {PROCESSED.format(v="b")} AS b_saw,
           {PROCESSED.format(v="a")}
            OR EXISTS (SELECT 1 FROM a_terms WHERE p.uploaded_at >= a_terms.since AND p.uploaded_at < a_terms.until)
           AS a_saw
    FROM photo_tags_summary t
    JOIN photos p ON p.user_id = t.user_id AND p.photo_id = t.photo_id AND p.status <> 'deleted'
"""
# One row per tag of a compared photo that only one version gave.
CHANGES = """
    SELECT user_id, photo_id, unnest(gained) AS landmark_id, 'gained' AS change FROM compared
    UNION ALL
    SELECT user_id, photo_id, unnest(lost), 'lost' FROM compared
"""
PHOTO_COUNTS = """
    SELECT count(*) AS photos_compared, coalesce(sum(tags_both), 0)::bigint AS tags_both,
           count(*) FILTER (WHERE tagged_a) AS photos_tagged_a, count(*) FILTER (WHERE tagged_b) AS photos_tagged_b,
           count(*) FILTER (WHERE tagged_b AND NOT tagged_a) AS gained_photos,
           count(*) FILTER (WHERE tagged_a AND NOT tagged_b) AS lost_photos,
           count(*) FILTER (WHERE top_a IS NOT NULL AND top_b IS NOT NULL) AS photos_tagged_both,
           count(*) FILTER (WHERE top_a = top_b) AS top1_same
    FROM compared
"""
CHANGE_COUNTS = """
    SELECT count(*) FILTER (WHERE change = 'gained') AS gained, count(*) FILTER (WHERE change = 'lost') AS lost
    FROM changes
"""
SEEN_COUNTS = """
    SELECT count(*) FILTER (WHERE NOT b_saw) AS pending, count(*) FILTER (WHERE b_saw AND NOT a_saw) AS unseen_by_a
    FROM judged
"""
# The landmarks with the most tags gained (or lost), then examples in (user, photo, landmark) order. COLLATE "C"
# sorts by code point, as Python did before this moved into SQL, whatever the database's collation.
BY_LANDMARK = """
    SELECT coalesce(json_agg(json_build_object('landmark_id', landmark_id, 'tags', tags)
                             ORDER BY tags DESC, landmark_id), '[]') AS {change}_by_landmark
    FROM (SELECT landmark_id, count(*) AS tags FROM changes WHERE change = '{change}'
          GROUP BY landmark_id ORDER BY tags DESC, landmark_id LIMIT :examples) AS top
"""
EXAMPLES = """
    SELECT coalesce(json_agg(json_build_object('user_id', user_id, 'photo_id', photo_id, 'landmark_id', landmark_id)
                             ORDER BY user_id COLLATE "C", photo_id COLLATE "C", landmark_id), '[]')
           AS {change}_examples
    FROM (SELECT user_id, photo_id, landmark_id FROM changes WHERE change = '{change}'
          ORDER BY user_id COLLATE "C", photo_id COLLATE "C", landmark_id LIMIT :examples) AS first
"""
# Everything is counted on the server, in one statement that computes each CTE once: the ops pod gets one row
# whatever the number of tags (loading them into Python took 1.8 GB at 3.5 M tags, and died at 30 M).
COMPARE_SQL = f"""
WITH a_terms AS MATERIALIZED ({A_TERMS}),
pairs AS MATERIALIZED ({PAIRS}),
photo_tags_summary AS ({PHOTO_TAGS}),
judged AS ({JUDGED}),
compared AS (SELECT * FROM judged WHERE a_saw AND b_saw),
changes AS ({CHANGES}),
photo_counts AS ({PHOTO_COUNTS}),
change_counts AS ({CHANGE_COUNTS}),
seen_counts AS ({SEEN_COUNTS}),
gained_by_landmark AS ({BY_LANDMARK.format(change="gained")}),
lost_by_landmark AS ({BY_LANDMARK.format(change="lost")}),
gained_examples AS ({EXAMPLES.format(change="gained")}),
lost_examples AS ({EXAMPLES.format(change="lost")})
SELECT * FROM photo_counts, change_counts, seen_counts, gained_by_landmark, lost_by_landmark, gained_examples,
              lost_examples
"""


def compare(engine: Engine, a: str, b: str, examples: int = 10, user: str | None = None) -> dict[str, Any]:
    """How version ``b`` (the candidate) tags the photos that version ``a`` (the baseline) tagged
    (one user's photos only, given ``user``).

    Unit: (photo, landmark) tags of photos that are not deleted, and that both versions have seen. A
    version has seen a photo if it tagged it, its verdict is the photo's latest (``photos.model_version``)
    or it processed the photo as a shadow (``shadow_photos``, tagged or not); ``a``, the baseline, has also
    seen every photo uploaded while it was the active version (``model_activations``). Photos with tags of
    ``a`` that ``b`` has not seen are left out and counted in ``pending`` (run a backfill under ``b`` to
    cover them); photos with tags of ``b`` that ``a`` never saw (uploaded while another version was active)
    in ``unseen_by_a``.

    * ``agreement``: tags both versions gave / tags either gave (Jaccard), over the photos compared;
    * ``top1_agreement``: among photos both tagged, the share whose best landmark (rank 0) is the same;
    * ``gained`` / ``lost``: tags only ``b`` / only ``a`` gave, with the photos and landmarks most affected.
    """
    with transaction(engine) as session:
        known = set(session.scalars(select(ModelVersion.version).where(ModelVersion.version.in_([a, b]))))
        missing = [v for v in (a, b) if v not in known]
        if missing:
            raise RolloutError(f"unknown model version(s): {', '.join(missing)}")
        counts = session.execute(text(COMPARE_SQL).bindparams(sa_bindparam("user", type_=Text)),
                                 {"a": a, "b": b, "user": user, "examples": examples}).mappings().one()
        seen_b = session.scalar(_processed_by(b, user))
        shadowed_b = session.scalar(_shadowed_by(b, user))
    return _report(counts, a=a, b=b, user=user, seen_b=seen_b, shadowed_b=shadowed_b)


def _report(c: RowMapping, *, a: str, b: str, user: str | None, seen_b: int, shadowed_b: int) -> dict[str, Any]:
    """The report's keys in the order `landmarks compare` has always printed them."""
    union = c["tags_both"] + c["gained"] + c["lost"]
    both_best = c["photos_tagged_both"]
    return {
        "a": a, "b": b, "user": user,
        "photos_compared": c["photos_compared"], "photos_processed_by_b": seen_b, "photos_shadowed_by_b": shadowed_b,
        "tags_a": c["tags_both"] + c["lost"], "tags_b": c["tags_both"] + c["gained"], "tags_both": c["tags_both"],
        "agreement": round(c["tags_both"] / union, 6) if union else None,
        "photos_tagged_a": c["photos_tagged_a"], "photos_tagged_b": c["photos_tagged_b"],
        "photos_tagged_both": both_best,
        "top1_agreement": round(c["top1_same"] / both_best, 6) if both_best else None,
        "gained": c["gained"], "lost": c["lost"],
        "gained_photos": c["gained_photos"], "lost_photos": c["lost_photos"],
        "pending": c["pending"], "unseen_by_a": c["unseen_by_a"],
        "gained_by_landmark": c["gained_by_landmark"], "lost_by_landmark": c["lost_by_landmark"],
        "gained_examples": c["gained_examples"], "lost_examples": c["lost_examples"],
    }


def _processed_by(version: str, user: str | None):
    """Photos (not deleted) whose latest verdict is ``version``'s, or that ``version`` shadowed: the two counted
    apart and added up, which reads each table once (their union sorted every photo: 5 s at 3 M photos)."""
    photos = Photo.__table__
    latest = (select(func.count()).select_from(photos)
              .where(photos.c.model_version == version, photos.c.status != "deleted"))
    if user is not None:
        latest = latest.where(photos.c.user_id == user)
    shadowed_only = _shadowed_by(version, user).where(photos.c.model_version.is_distinct_from(version))
    return select(latest.scalar_subquery() + shadowed_only.scalar_subquery())


def _shadowed_by(version: str, user: str | None):
    photos, shadowed = Photo.__table__, ShadowPhoto.__table__
    query = (select(func.count()).select_from(shadowed)
             .join(photos, (photos.c.user_id == shadowed.c.user_id) & (photos.c.photo_id == shadowed.c.photo_id))
             .where(shadowed.c.model_version == version, photos.c.status != "deleted"))
    return query.where(photos.c.user_id == user) if user is not None else query


# --- shadow --------------------------------------------------------------------------------------

def _shadow_dict(row: ShadowRollout) -> dict[str, Any]:
    return {"version": row.version, "share": row.share, "actor": row.actor, "started_at": row.started_at,
            "stopped_at": row.stopped_at, "stop_reason": row.stop_reason}


def start_shadow(version: str, share: float, engine: Engine, index: LandmarkIndex,
                 who: str | None = None) -> dict[str, Any]:
    """Run the published ``version`` beside the active one on ``share`` of the photos (replacing any
    running shadow). Workers see it within ``shared.shadow.SHADOW_REFRESH_S`` and load its model."""
    _require_published(version, index)
    try:
        with transaction(engine) as session:
            row = start_shadow_rollout(session, version, share, who or actor())
            started = _shadow_dict(row)
    except LookupError:
        raise RolloutError(f"model version {version!r} is not registered: `landmarks publish MODEL` first") from None
    except ValueError as exc:
        raise RolloutError(str(exc)) from None
    log.info("shadow: model %s on %.1f%% of photos", version, 100 * share, extra={"model_version": version})
    return started


def stop_shadow(engine: Engine, version: str | None = None) -> dict[str, Any] | None:
    """End the running shadow (only if it is ``version``, given one); None if there was none to end."""
    with transaction(engine) as session:
        row = stop_shadow_rollout(session, reason="stopped", version=version)
        stopped = _shadow_dict(row) if row is not None else None
    if stopped is not None:
        log.info("shadow: model %s stopped", stopped["version"], extra={"model_version": stopped["version"]})
    return stopped


def shadow_status(engine: Engine) -> dict[str, Any] | None:
    with transaction(engine) as session:
        row = running_shadow(session)
        return _shadow_dict(row) if row is not None else None
