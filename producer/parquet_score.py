"""Score a Parquet file: the same guarantees as producer.bulk for CSV, for data teams'
columnar files.

The input is read in record batches of `chunk_rows`; each batch's feature columns go as
float32 (`rows_f32`) to the row queue, a few in flight; the output is the input's batches,
every column and type kept, with the prediction (and with `explain` the SHAP columns,
producer.bulk_outputs) appended as float32 columns, written in input order to a temporary
file renamed into place only when complete. Resumable through the same journal as CSV
scoring (producer.journal): each batch's feature values are digested, a finished batch's
values come from the journal, a sent one's result is collected if it is still there.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from contract.errors import InvalidInput, JournalError
from contract.names import row_queue
from contract.schemas import check_f32_shape, encode_f32
from producer.bulk import ScoreSummary
from producer.bulk_outputs import EXPLAIN_CHUNK_ROWS, Outputs
from producer.client import Client, raise_for, resolve_queue
from producer.csv_chunks import choose_columns
from producer.journal import Journal, fsync_dir, job_header, journal_path

PARQUET_SUFFIXES = (".parquet", ".pq")


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES


def _features(batch: pa.RecordBatch, columns: list[int], first_row: int) -> NDArray[np.float32]:
    try:
        matrix = np.column_stack(
            [batch.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in columns]
        )
    except (TypeError, ValueError, pa.ArrowInvalid) as exc:
        raise InvalidInput(f"rows {first_row}-{first_row + batch.num_rows - 1}: {exc}") from None
    bad = ~np.isfinite(matrix)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        name = batch.schema.names[columns[column]]
        raise InvalidInput(f"row {first_row + row}, column {name!r}: missing or not finite")
    return np.ascontiguousarray(matrix)


def score_parquet(
    client: Client,
    in_path: Path,
    out_path: Path,
    *,
    queue: str = "cpu",
    chunk_rows: int | None = None,
    max_in_flight: int | None = None,
    features: list[str] | None = None,
    timeout_s: float | None = None,
    restart: bool = False,
    explain: bool = False,
    log: Callable[[str], None] | None = None,
) -> ScoreSummary:
    """Score `in_path` (Parquet) into `out_path` (Parquet), resuming an earlier run's
    journal if there is one (`restart` discards it instead)."""
    default_rows = client.settings.chunk_rows
    chunk_rows = chunk_rows or (min(default_rows, EXPLAIN_CHUNK_ROWS) if explain else default_rows)
    in_flight = max_in_flight or client.settings.max_in_flight
    info = client.model_info(queue)
    if info is not None:
        chunk_rows = min(chunk_rows, info.max_batch_rows)
    outputs = Outputs.choose(explain, info)
    summary = ScoreSummary()
    started = time.perf_counter()
    source = pq.ParquetFile(in_path)
    names = list(source.schema_arrow.names)
    n_features = info.n_features if info else None
    columns = choose_columns(names, n_features, features or (info.feature_names if info else None))
    job = job_header(in_path, columns, chunk_rows, queue, names)
    job["format"] = "parquet"
    if outputs.explain:
        job["outputs"] = outputs.columns
    journal, state = Journal.open(journal_path(out_path), job, restart)
    target = row_queue(resolve_queue(queue))
    schema = source.schema_arrow
    for name in outputs.columns:
        schema = schema.append(pa.field(name, pa.float32()))
    tmp = out_path.with_name(f".{out_path.name}.part")
    try:
        if log and (state.done or state.sent):
            log(f"resuming from {journal.path}: {len(state.done)} chunk(s) already done")
        with pq.ParquetWriter(tmp, schema) as writer:
            window: dict[int, tuple[pa.RecordBatch, str, str | None]] = {}
            values: dict[int, NDArray[np.float32]] = {}
            next_write = 0

            def finish(index: int, result: dict[str, object]) -> None:
                batch, digest, _ = window[index]
                got = outputs.values(result, batch.num_rows)
                model = f"{result.get('model_name')}/{result.get('model_version')}"
                journal.append(
                    {"done": index, "digest": digest, "rows": batch.num_rows, "model": model,
                     "predictions": encode_f32(got.reshape(-1))}
                )  # fmt: skip
                summary.models.add(model)
                values[index] = got

            def collect() -> None:
                nonlocal next_write
                ids = {task: i for i, (_, _, task) in window.items() if task and i not in values}
                for status in client.wait_any(list(ids), timeout_s):
                    finish(ids[status.task_id], raise_for(status))
                while next_write in values:
                    batch, _, _ = window.pop(next_write)
                    got = values.pop(next_write).reshape(batch.num_rows, -1)
                    added = [pa.array(got[:, j]) for j in range(outputs.width)]
                    arrays = [*batch.columns, *added]
                    writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
                    next_write += 1

            first_row = 0
            for index, batch in enumerate(source.iter_batches(batch_size=chunk_rows)):
                matrix = _features(batch, columns, first_row)
                first_row += batch.num_rows
                summary.chunks += 1
                summary.rows += batch.num_rows
                digest = hashlib.sha256(matrix.tobytes()).hexdigest()
                done, sent = state.done.pop(index, None), state.sent.pop(index, None)
                recorded = done.digest if done else sent.digest if sent else digest
                if recorded != digest:
                    raise JournalError(
                        f"the input changed (rows {first_row - batch.num_rows}-{first_row - 1}) "
                        f"since {journal.path} recorded it; pass --restart to score from the start"
                    )
                window[index] = (batch, digest, None)
                if done is not None:
                    values[index] = done.predictions
                    summary.resumed += 1
                    summary.models.add(done.model)
                elif sent is not None and (
                    ok := [s for s in client.statuses(sent.task_ids) if s.state == "SUCCESS"]
                ):
                    finish(index, raise_for(ok[0]))
                    summary.recollected += 1
                else:
                    if info is not None:
                        n, k = matrix.shape
                        check_f32_shape(n, k, info.n_features, info.max_batch_rows)
                    kwargs = {"rows_f32": encode_f32(matrix), "n_features": matrix.shape[1]}
                    task_id = client.send(outputs.task, kwargs, target)
                    journal.append({"sent": index, "digest": digest, "task_id": task_id})
                    window[index] = (batch, digest, task_id)
                    summary.sent += 1
                while sum(1 for i, w in window.items() if w[2] and i not in values) >= in_flight:
                    collect()
            while window:
                collect()
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out_path)
        fsync_dir(out_path.parent)
        journal.discard()
    finally:
        journal.close()
        tmp.unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - started
    return summary
