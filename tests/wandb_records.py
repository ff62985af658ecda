"""Read the records of an offline wandb run file (run-*.wandb): a log of protobuf records in 32 KiB
blocks, each record split into chunks behind a 7-byte header (checksum, length, chunk type)."""
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7  # the file's own header (":W&B", magic, version), then the chunk headers
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:
            break
        pending += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def runs_and_artifacts(wandb_dir: Path) -> tuple[list, list]:
    """(run records, artifact records) of every offline run under a wandb directory."""
    runs, artifacts = [], []
    for f in sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb")):
        for r in read_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                runs.append(r.run)
            elif kind == "artifact":
                artifacts.append(r.artifact)
    return runs, artifacts
