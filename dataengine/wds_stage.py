"""The reader's tar parsing and decoding as a stage of a ``webdataset`` pipeline.

For users who build their input with webdataset's own pipeline (their shard lists, splitting,
shuffling, batching) and want the shards decoded the fast way::

    import webdataset as wds
    from dataengine.wds_stage import decoded_samples

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),          # or wds.ResampledShards(urls)
        wds.split_by_worker,
        decoded_samples(fields=("json", "feat")),   # replaces tarfile_to_samples() + decode()
        wds.shuffle(256),
        wds.batched(16, collation_fn=list),
    )

:func:`decoded_samples` takes the shard items webdataset's shard lists yield (``{"url": ...}``
dicts, or plain URLs) and yields one dict per sample: ``__key__`` and ``__url__`` as
webdataset names them, then the members decoded as :class:`~dataengine.reader.ShardReader`
decodes them — ``json`` a dict, ``feat``/``clips`` writable float16 tensors over buffers that
are reused once dropped, other members as bytes under their suffix; members not in
``fields`` are skipped unread on local files. Each tar is read once, sequentially, with the
reader's parser (:mod:`dataengine.tario`): no ``tarfile``, no pickle.

Errors follow webdataset's ``handler`` convention: None raises; otherwise
``handler(exc)`` returning True goes on (a bad member loses its sample; a broken tar
structure the rest of that tar), False stops. Errors are
:class:`~dataengine.tario.ShardError` naming the URL, key, member and byte offset.

A whole shard *set* (manifest, curriculum stages, ranks, resume) is
:class:`~dataengine.reader.ShardReader`; it is an ``IterableDataset`` and so also a valid
first stage: ``wds.DataPipeline(ShardReader("shards/x", stages=["easy"]), wds.batched(8))``.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

from dataengine.fetch import DEFAULT_REQUIRED, ReadContext, ReaderStats, shard_failure
from dataengine.prefetch import BufferPool
from dataengine.sources import open_url
from dataengine.tario import ShardError, TarError, TarReader, split_name

Handler = Callable[[BaseException], bool]


def decoded_samples(*, fields: Sequence[str] | None = None, handler: Handler | None = None,
                    allow_pipe: bool = False, pool_bytes: int = 96 << 20) -> Callable[[Iterable[Any]], Iterator[dict]]:
    """A webdataset pipeline stage: shard items in, decoded samples out (see the module docstring).

    ``fields``: members to decode (``"json"``, ``"feat"``, ``"clips"``, full suffixes); None
    decodes every member and requires json and feat. ``allow_pipe`` allows ``pipe:`` URLs.
    ``pool_bytes`` bounds the reused member buffers. The stage is a ``functools.partial``
    (picklable, for DataLoader workers that spawn)."""
    return functools.partial(tar_samples, fields=None if fields is None else tuple(fields), handler=handler,
                             allow_pipe=allow_pipe, pool_bytes=pool_bytes)


def tar_samples(shards: Iterable[Any], *, fields: tuple[str, ...] | None = None, handler: Handler | None = None,
                allow_pipe: bool = False, pool_bytes: int = 96 << 20) -> Iterator[dict]:
    """The samples of each tar in ``shards`` (``{"url": URL}`` items or URLs), in file order."""
    ctx = ReadContext(fields=fields, required=DEFAULT_REQUIRED if fields is None else fields, verify=False,
                      allow_pipe=allow_pipe, on_error="raise", stats=ReaderStats(), pool=BufferPool(pool_bytes))
    for item in shards:
        url = item["url"] if isinstance(item, dict) else os.fspath(item)
        try:
            yield from _one_tar(url, ctx, handler)
        except _Stop:
            return
        except (ShardError, OSError, ValueError) as exc:  # SourceError included; the rest of this tar is lost
            if handler is None:
                raise
            if not handler(exc):
                return


class _Stop(Exception):
    """The handler said stop after a lost sample."""


def _one_tar(url: str, ctx: ReadContext, handler: Handler | None) -> Iterator[dict]:
    f, size = open_url(url, allow_pipe=ctx.allow_pipe)
    with f:
        tar = TarReader(f, url, size=size)
        seen: set[str] = set()
        try:
            member = tar.next()
            while member is not None:
                key = split_name(member.name)[0]
                if key in seen:
                    raise ShardError(url, f"members of this key are not contiguous (member {member.name!r} "
                                          "comes after other keys)", key=key, offset=member.offset,
                                     reason="non-contiguous key", whole_shard=True)
                seen.add(key)
                out: dict[str, Any] = {"__key__": key, "__url__": url}
                suffixes: list[str] = []
                problem: ShardError | None = None
                while member is not None:
                    member_key, suffix = split_name(member.name)
                    if member_key != key:
                        break
                    suffixes.append(suffix)
                    problem = ctx.member(tar, url, out, key, suffix, member, problem)
                    member = tar.next()
                try:
                    ctx.check(url, key, suffixes, problem)
                except ShardError as exc:  # one sample lost
                    if handler is None:
                        raise
                    if not handler(exc):
                        raise _Stop() from exc
                    continue
                ctx.stats.samples += 1
                yield out
                out = None  # type: ignore[assignment]  # not held while the next is read: buffers reused
        except (TarError, OSError) as exc:
            raise shard_failure(url, exc) from exc
