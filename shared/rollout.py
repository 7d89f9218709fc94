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

from sqlalchemy import Text, func, select, text
from sqlalchemy import bindparam as sa_bindparam
from sqlalchemy.engine import Engine

from shared.db.models import ModelActivation, ModelVersion, Photo, PhotoTag, ShadowPhoto, ShadowRollout
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
             who: str | None = None, require_coverage: bool = False) -> Activation:
    """Make an already published version active (Milvus alias, then PostgreSQL), recording ``action``;
    with ``require_coverage``, only once every photo in the albums has been through it."""
    with activation_lock(engine):
        return _activate_holding_lock(version, engine, index, action=action, who=who,
                                      require_coverage=require_coverage)


def _activate_holding_lock(version: str, engine: Engine, index: LandmarkIndex, *, action: str, who: str | None,
                           require_coverage: bool) -> Activation:
    with transaction(engine) as session:
        if session.get(ModelVersion, version) is None:
            raise RolloutError(f"model version {version!r} is not registered: `landmarks publish MODEL` first")
    _require_published(version, index)
    previous = _active(engine)
    alias = index.active_version()
    if previous == version and alias == version:
        return Activation(version, previous, action, changed=False)
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
    """Activate ``version``; refused (unless ``force``) while photos in the albums have not been through it."""
    return activate(version, engine, index, action="promote", who=who, require_coverage=not force)


# Photos in the active version's albums that ``candidate`` has not processed (live or as a shadow): the album
# views show only the active version's tags, so promoting takes them out of the albums until it tags them.
UNCOVERED_SQL = """
SELECT count(DISTINCT (t.user_id, t.photo_id))
FROM photo_tags t
JOIN model_versions mv ON mv.version = t.model_version AND mv.is_active AND mv.version <> :candidate
JOIN photos p ON p.user_id = t.user_id AND p.photo_id = t.photo_id AND p.status <> 'deleted'
WHERE p.model_version IS DISTINCT FROM :candidate
  AND NOT EXISTS (SELECT 1 FROM shadow_photos s
                  WHERE s.user_id = t.user_id AND s.photo_id = t.photo_id AND s.model_version = :candidate)
  AND NOT EXISTS (SELECT 1 FROM photo_tags c
                  WHERE c.user_id = t.user_id AND c.photo_id = t.photo_id AND c.model_version = :candidate)
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


def rollback(engine: Engine, index: LandmarkIndex, who: str | None = None) -> Activation:
    with activation_lock(engine):  # the target is read from the history this rollback then extends
        _require_whole_swap(engine, index)
        target, _ = rollback_target(engine)
        return _activate_holding_lock(target, engine, index, action="rollback", who=who, require_coverage=False)


def _require_whole_swap(engine: Engine, index: LandmarkIndex) -> None:
    """A promote that moved the alias but not the albums' version leaves workers on the new version while
    the history ends at the old one: a rollback from there would go back two versions."""
    albums, serving = _active(engine), index.active_version()  # the alias names the version sanitised
    if serving is not None and albums is not None and serving != sanitize_version(albums):
        raise RolloutError(f"a half-done swap: workers follow {serving} (Milvus) while the albums show {albums} "
                           f"(PostgreSQL). `landmarks promote {albums} --force` puts the workers back on {albums}; "
                           f"`landmarks promote {serving} --force` finishes the swap")


def versions(engine: Engine, index: LandmarkIndex | None = None) -> list[dict[str, Any]]:
    table = ModelVersion.__table__
    in_milvus = set(index.versions()) if index is not None else None
    with transaction(engine) as session:
        rows = session.execute(select(table.c.version, table.c.created_at, table.c.is_active, table.c.backbone,
                                      table.c.checkpoint).order_by(table.c.created_at)).mappings().all()
        tagged = dict(session.execute(select(PhotoTag.model_version, func.count(func.distinct(
            PhotoTag.user_id + "/" + PhotoTag.photo_id))).group_by(PhotoTag.model_version)).all())
        shadowed = dict(session.execute(select(ShadowPhoto.model_version, func.count())
                                        .group_by(ShadowPhoto.model_version)).all())
        shadow = running_shadow(session)
    out = []
    for row in rows:
        item = dict(row)
        item["tagged_photos"] = tagged.get(row["version"], 0)
        item["shadow_photos"] = shadowed.get(row["version"], 0)
        item["shadow"] = _shadow_dict(shadow) if shadow is not None and shadow.version == row["version"] else None
        if in_milvus is not None:
            item["in_milvus"] = row["version"] in in_milvus
        out.append(item)
    return out


# --- compare -------------------------------------------------------------------------------------

# Photos a version has processed: it tagged them, its verdict is the latest, or it shadowed them.
SEEN_BY = """
    SELECT user_id, photo_id FROM photo_tags WHERE model_version = :{v} AND (:user IS NULL OR user_id = :user)
    UNION
    SELECT user_id, photo_id FROM photos WHERE model_version = :{v} AND (:user IS NULL OR user_id = :user)
    UNION  -- as a shadow, including the photos it found no landmark on
    SELECT user_id, photo_id FROM shadow_photos WHERE model_version = :{v} AND (:user IS NULL OR user_id = :user)
"""
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
COMPARE_SQL = f"""
WITH seen_a AS ({SEEN_BY.format(v="a")}),
seen_b AS ({SEEN_BY.format(v="b")}),
a_terms AS ({A_TERMS}),
pairs AS (
    SELECT t.user_id, t.photo_id, t.landmark_id, p.uploaded_at,
           bool_or(t.model_version = :a) AS in_a, bool_or(t.model_version = :b) AS in_b,
           min(t.rank) FILTER (WHERE t.model_version = :a) AS rank_a,
           min(t.rank) FILTER (WHERE t.model_version = :b) AS rank_b
    FROM photo_tags t
    JOIN photos p ON p.user_id = t.user_id AND p.photo_id = t.photo_id AND p.status <> 'deleted'
    WHERE t.model_version IN (:a, :b) AND (:user IS NULL OR t.user_id = :user)
    GROUP BY t.user_id, t.photo_id, t.landmark_id, p.uploaded_at
),
judged AS (
    SELECT pairs.*, (s.photo_id IS NOT NULL) AS b_saw,
           (sa.photo_id IS NOT NULL OR EXISTS (SELECT 1 FROM a_terms
                                                WHERE pairs.uploaded_at >= a_terms.since
                                                  AND pairs.uploaded_at < a_terms.until)) AS a_saw
    FROM pairs
    LEFT JOIN seen_b s ON s.user_id = pairs.user_id AND s.photo_id = pairs.photo_id
    LEFT JOIN seen_a sa ON sa.user_id = pairs.user_id AND sa.photo_id = pairs.photo_id
)
SELECT * FROM judged
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
        rows = session.execute(text(COMPARE_SQL).bindparams(sa_bindparam("user", type_=Text)),
                               {"a": a, "b": b, "user": user}).mappings().all()
        seen_b = session.scalar(_processed_by(b, user))
        shadowed_b = session.scalar(_shadowed_by(b, user))
    compared = [r for r in rows if r["a_saw"] and r["b_saw"]]
    pending_photos = {(r["user_id"], r["photo_id"]) for r in rows if not r["b_saw"]}
    unseen_by_a = {(r["user_id"], r["photo_id"]) for r in rows if r["b_saw"] and not r["a_saw"]}
    both = [r for r in compared if r["in_a"] and r["in_b"]]
    gained = [r for r in compared if r["in_b"] and not r["in_a"]]
    lost = [r for r in compared if r["in_a"] and not r["in_b"]]

    top_a: dict[tuple[str, str], int] = {}
    top_b: dict[tuple[str, str], int] = {}
    for r in compared:
        key = (r["user_id"], r["photo_id"])
        if r["rank_a"] == 0:
            top_a[key] = r["landmark_id"]
        if r["rank_b"] == 0:
            top_b[key] = r["landmark_id"]
    tagged_by_both = set(top_a) & set(top_b)
    photos_a = {(r["user_id"], r["photo_id"]) for r in compared if r["in_a"]}
    photos_b = {(r["user_id"], r["photo_id"]) for r in compared if r["in_b"]}

    def by_landmark(items: list) -> list[dict[str, int]]:
        counts: dict[int, int] = {}
        for r in items:
            counts[r["landmark_id"]] = counts.get(r["landmark_id"], 0) + 1
        return [{"landmark_id": k, "tags": v} for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:examples]]

    def sample(items: list) -> list[dict[str, Any]]:
        return [{"user_id": r["user_id"], "photo_id": r["photo_id"], "landmark_id": r["landmark_id"]}
                for r in sorted(items, key=lambda r: (r["user_id"], r["photo_id"], r["landmark_id"]))[:examples]]

    union = len(compared)
    return {
        "a": a, "b": b, "user": user,
        "photos_compared": len(photos_a | photos_b),
        "photos_processed_by_b": seen_b,
        "photos_shadowed_by_b": shadowed_b,
        "tags_a": len(both) + len(lost), "tags_b": len(both) + len(gained), "tags_both": len(both),
        "agreement": round(len(both) / union, 6) if union else None,
        "photos_tagged_a": len(photos_a), "photos_tagged_b": len(photos_b),
        "photos_tagged_both": len(tagged_by_both),
        "top1_agreement": (round(sum(top_a[k] == top_b[k] for k in tagged_by_both) / len(tagged_by_both), 6)
                           if tagged_by_both else None),
        "gained": len(gained), "lost": len(lost),
        "gained_photos": len(photos_b - photos_a), "lost_photos": len(photos_a - photos_b),
        "pending": len(pending_photos), "unseen_by_a": len(unseen_by_a),
        "gained_by_landmark": by_landmark(gained), "lost_by_landmark": by_landmark(lost),
        "gained_examples": sample(gained), "lost_examples": sample(lost),
    }


def _processed_by(version: str, user: str | None):
    """Photos (not deleted) whose latest verdict is ``version``'s, or that ``version`` shadowed."""
    photos, shadowed = Photo.__table__, ShadowPhoto.__table__
    as_shadow = select(shadowed.c.user_id, shadowed.c.photo_id).where(shadowed.c.model_version == version)
    as_active = select(photos.c.user_id, photos.c.photo_id).where(photos.c.model_version == version)
    seen = as_active.union(as_shadow).subquery()
    query = (select(func.count()).select_from(seen)
             .join(photos, (photos.c.user_id == seen.c.user_id) & (photos.c.photo_id == seen.c.photo_id))
             .where(photos.c.status != "deleted"))
    return query.where(photos.c.user_id == user) if user is not None else query


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
