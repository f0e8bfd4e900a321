"""The migration report: what each round moved, what the switch-over cost, the downtime.

Units are in the field names (``_s`` seconds, ``_bytes`` bytes). ``Report.to_json()``
is the machine form (stable keys), ``Report.table()`` the human one, and
``Report.to_prometheus()`` fills a prometheus-client registry (optional dependency).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional


@dataclass
class RoundReport:
    index: int                      # 0 = first full pass
    pages: int                      # pages sent in this round
    bytes_raw: int                  # pages * page_size
    bytes_wire: int                 # bytes on the wire (frames included)
    duration_s: float
    dirty_pages_after: int = 0      # pages the tracker reported at the end of the round
    predicted_downtime_s: float = float("nan")  # if we stopped after this round
    decision: str = ""

    @property
    def mbps(self) -> float:
        return self.bytes_wire / self.duration_s / 1e6 if self.duration_s > 0 else 0.0


def _encryption_text(cipher: str) -> str:
    if not cipher:
        return "-"
    if cipher == "hmac-sha256":
        return "OFF (hmac-sha256: authenticated only, pages in clear)"
    return cipher


@dataclass
class Report:
    pid: int
    dest: str
    strategy: str
    tracker: str = ""
    codec: str = "raw"
    memory_backend: str = ""
    # The wire protocol's cipher suite: "aes-256-gcm" / "chacha20-poly1305" (encrypted),
    # "hmac-sha256" (encryption off: authenticated only), "" before the handshake.
    encryption: str = ""
    scheduler: str = ""
    page_size: int = 4096
    ok: bool = False
    error: Optional[str] = None
    failed_phase: Optional[str] = None
    source_resumed: Optional[bool] = None
    rounds: List[RoundReport] = field(default_factory=list)
    # switch-over phases, seconds
    phases: Dict[str, float] = field(default_factory=dict)
    final_pages: int = 0
    final_bytes_wire: int = 0
    images_bytes: int = 0
    state_pages: int = 0            # pages in the CRIU dump
    downtime_s: float = float("nan")
    predicted_downtime_s: float = float("nan")
    total_s: float = float("nan")
    bytes_wire_total: int = 0
    restored_pid: Optional[int] = None
    criu_dump_stats: Dict[str, int] = field(default_factory=dict)
    criu_restore_stats: Dict[str, int] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    @property
    def precopy_pages(self) -> int:
        return sum(r.pages for r in self.rounds)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, float) and math.isnan(v):
                d[k] = None
        for r in d["rounds"]:
            for k, v in list(r.items()):
                if isinstance(v, float) and math.isnan(v):
                    r[k] = None
        return d

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        d = dict(d)
        rounds = [RoundReport(**{k: (float("nan") if v is None and k == "predicted_downtime_s"
                                     else v) for k, v in r.items()})
                  for r in d.pop("rounds", [])]
        for k in ("downtime_s", "predicted_downtime_s", "total_s"):
            if d.get(k) is None:
                d[k] = float("nan")
        return cls(rounds=rounds, **d)

    def table(self) -> str:
        ms = lambda s: ("-" if s is None or (isinstance(s, float) and math.isnan(s))  # noqa: E731
                        else f"{s * 1e3:9.1f} ms")
        lines = [f"migration of pid {self.pid} to {self.dest}: "
                 f"{'OK' if self.ok else 'FAILED'}"
                 + (f" [{self.failed_phase}] {self.error}" if not self.ok and self.error else ""),
                 f"  strategy {self.strategy}, tracker {self.tracker or '-'}, codec {self.codec}, "
                 f"scheduler {self.scheduler or '-'}, "
                 f"encryption {_encryption_text(self.encryption)}"]
        if self.rounds:
            lines.append("  round     pages      MB raw     MB wire   duration      MB/s"
                         "   dirty after  predicted downtime")
            for r in self.rounds:
                lines.append(f"  {r.index:5d} {r.pages:9d} {r.bytes_raw / 1e6:11.2f} "
                             f"{r.bytes_wire / 1e6:11.2f} {ms(r.duration_s)} {r.mbps:9.1f} "
                             f"{r.dirty_pages_after:13d}  {ms(r.predicted_downtime_s)}")
        lines.append("  switch-over:")
        for k, v in self.phases.items():
            lines.append(f"    {k:<22s}{ms(v)}")
        lines.append(f"  final transfer: {self.final_pages} pages, "
                     f"{self.final_bytes_wire / 1e6:.2f} MB pages, "
                     f"{self.images_bytes / 1e6:.2f} MB other images "
                     f"(dump had {self.state_pages} pages)")
        lines.append(f"  downtime {ms(self.downtime_s).strip()} (predicted "
                     f"{ms(self.predicted_downtime_s).strip()}), total {ms(self.total_s).strip()}, "
                     f"{self.bytes_wire_total / 1e6:.2f} MB on the wire")
        if self.restored_pid:
            lines.append(f"  restored pid {self.restored_pid} on the destination")
        if self.source_resumed is not None and not self.ok:
            lines.append(f"  source resumed: {self.source_resumed}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)

    def to_prometheus(self, registry=None, prefix: str = "statesync_migration"):
        """Fill (and return) a ``prometheus_client.CollectorRegistry`` with gauges:
        ``<prefix>_downtime_seconds``, ``_total_seconds``, ``_bytes_total``,
        ``_rounds``, ``_phase_seconds{phase=...}``, ``_round_bytes{round=...}``,
        ``_success``, ``_info{codec=...,encryption=...}`` (always 1; ``encryption`` is
        the cipher suite, ``hmac-sha256`` when off). Raises ImportError if
        prometheus-client is not installed."""
        from prometheus_client import CollectorRegistry, Gauge

        reg = registry if registry is not None else CollectorRegistry()
        s = self.strategy
        for name, doc, value in (
                ("downtime_seconds", "Service downtime (freeze to restored)", self.downtime_s),
                ("total_seconds", "Total migration time", self.total_s),
                ("bytes_total", "Bytes sent on the wire", self.bytes_wire_total),
                ("rounds", "Pre-copy rounds", len(self.rounds)),
                ("success", "1 if the migration succeeded", 1 if self.ok else 0)):
            Gauge(f"{prefix}_{name}", doc, ["strategy"], registry=reg).labels(strategy=s).set(value)
        ph = Gauge(f"{prefix}_phase_seconds", "Switch-over phase durations",
                   ["strategy", "phase"], registry=reg)
        for k, v in self.phases.items():
            ph.labels(strategy=s, phase=k).set(v)
        rb = Gauge(f"{prefix}_round_bytes", "Bytes on the wire per round",
                   ["strategy", "round"], registry=reg)
        for r in self.rounds:
            rb.labels(strategy=s, round=str(r.index)).set(r.bytes_wire)
        Gauge(f"{prefix}_info", "Always 1; labels: codec and wire encryption used",
              ["strategy", "codec", "encryption"], registry=reg).labels(
            strategy=s, codec=self.codec, encryption=self.encryption or "unknown").set(1)
        return reg

    def write_prometheus(self, path: str) -> None:
        """Write the metrics in the text exposition format (node-exporter textfile)."""
        from prometheus_client import write_to_textfile
        write_to_textfile(path, self.to_prometheus())
