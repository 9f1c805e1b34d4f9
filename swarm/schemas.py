"""The typed records peers write into the DHT. Anything read back is validated against these
models; a record that does not fit is dropped (and logged), never trusted."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)
T = TypeVar("T", bound=BaseModel)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RunRecord(_Record):
    run_id: str
    config: dict[str, Any]
    coordinator: str = Field(description="peer id of the coordinator")
    created: float


class RunAnnouncement(_Record):
    created: float
    model: str


class LeaseRecord(_Record):
    head: int = Field(ge=0)
    peer: str
    claimed_at: float
    released: bool = False


class DonorRecord(_Record):
    round: int = Field(ge=0)
    digest: str


class ReadyRecord(_Record):
    """A contribution to merge round `round`: the heads it covers, their local steps, its size."""

    round: int = Field(ge=0)
    heads: list[int]
    head_steps: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    ready_at: float


class HashRecord(_Record):
    """A peer's W after merge round `round`, and the contributors it merged (sorted peer ids)."""

    round: int = Field(ge=0)
    digest: str
    members: list[str]


def parse(model: type[T], value: Any, where: str = "") -> T | None:
    """Validate one DHT value; None (with a warning) if it does not fit the schema."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        log.warning("dropping malformed %s record%s: %s", model.__name__, f" at {where}" if where else "",
                    exc.errors()[0].get("msg", exc))
        return None


def dump(record: BaseModel) -> dict[str, Any]:
    return record.model_dump(mode="json")


def store(dht, key: str, subkey: str, record: BaseModel, expiration: float) -> bool:
    """Write one typed record under `key`/`subkey` (the boolean is only a hint, as in hivemind)."""
    return bool(dht.store(key, dump(record), expiration_time=expiration, subkey=subkey))


def read(dht, key: str, model: type[T], now: float | None = None) -> dict[str, tuple[T, float]]:
    """Every unexpired, well-formed record under `key`: subkey -> (record, expiration)."""
    from hivemind.utils import get_dht_time

    found = dht.get(key, latest=True)
    now = get_dht_time() if now is None else now
    if found is None or not isinstance(found.value, dict):
        return {}
    out: dict[str, tuple[T, float]] = {}
    for subkey, item in found.value.items():
        value, expiration = getattr(item, "value", None), getattr(item, "expiration_time", 0.0)
        if expiration < now:
            continue
        record = parse(model, value, where=f"{key}/{subkey}")
        if record is not None:
            out[str(subkey)] = (record, expiration)
    return out
