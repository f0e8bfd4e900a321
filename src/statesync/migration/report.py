"""The migration report: what each round moved, what the switch-over cost, the downtime.

Units are in the field names (``_s`` seconds, ``_bytes`` bytes). ``Report.to_json()``
is the machine form (stable keys), ``Report.table()`` the human one, and
``Report.to_prometheus()`` fills a prometheus-client registry (optional dependency).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional


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
    # "lazy" (the destination restored from the pages it held, filled in the
    # background after the resume) or "full" (complete image set, full criu restore)
    switchover: str = ""
    # the post-switch phase of a lazy switch-over: fill_s (seconds from the resume to
    # the last page placed), pages_filled, faults, fault_p50_ns / fault_p99_ns; with
    # post-copy (strategy postcopy/hybrid) also postcopy = 1, remote_pages (left at the
    # source at the freeze), remote_faults (faults that waited for the source),
    # remote_requested, remote_exist, remote_fault_p50_ns / _p99_ns / _max_ns (fault to
    # page placed, round trip included) and push_s (resume to last page acknowledged)
    post_switch: Dict[str, float] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    # KPI: {"max_downtime_s": {"target": 1.0, "measured": 0.2, "met": True}, ...};
    # "met" is None when the migration did not get far enough to measure it.
    kpi: Dict[str, dict] = field(default_factory=dict)
    migration_id: str = ""          # unique per migration (metrics label, logs)
    source: str = ""                # this host's name
    started_at: float = float("nan")  # Unix time the migration started
    netns: Optional[str] = None

    def set_targets(self, targets) -> None:
        """Record ``targets`` (a :class:`~statesync.planning.kpi.Targets`) and whether
        the measured downtime / total time / bandwidth met each."""
        def entry(target, measured):
            if target is None or (isinstance(target, float) and math.isinf(target)):
                return None
            ok = None if measured is None or math.isnan(measured) else bool(measured <= target)
            return {"target": target, "measured": None if ok is None else measured, "met": ok}
        kpi = {"max_downtime_s": entry(targets.max_downtime_s,
                                       self.downtime_s if self.ok else float("nan")),
               "max_total_time_s": entry(targets.max_total_time_s,
                                         self.total_s if self.ok else float("nan"))}
        bw = getattr(targets, "max_bandwidth_bytes_per_s", None)
        if bw:
            busy = sum(r.duration_s for r in self.rounds) + self.phases.get("final_transfer", 0.0)
            rate = self.bytes_wire_total / busy if busy > 0 else float("nan")
            kpi["max_bandwidth_bytes_per_s"] = entry(bw, rate)
        self.kpi = {k: v for k, v in kpi.items() if v is not None}

    @property
    def kpi_met(self) -> Optional[bool]:
        """True when every target was met, False when one was missed, None unknown."""
        vals = [v["met"] for v in self.kpi.values()]
        if any(v is False for v in vals):
            return False
        return True if vals and all(v is True for v in vals) else None

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
        def one(r: dict) -> RoundReport:
            fields: Dict[str, Any] = {k: (float("nan") if v is None and k == "predicted_downtime_s"
                                          else v) for k, v in r.items()}
            return RoundReport(**fields)
        rounds = [one(r) for r in d.pop("rounds", [])]
        for k in ("downtime_s", "predicted_downtime_s", "total_s", "started_at"):
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
        lines.append(f"  switch-over{' ' + self.switchover if self.switchover else ''}:")
        for k, v in self.phases.items():
            lines.append(f"    {k:<22s}{ms(v)}")
        lines.append(f"  final transfer: {self.final_pages} pages, "
                     f"{self.final_bytes_wire / 1e6:.2f} MB pages, "
                     f"{self.images_bytes / 1e6:.2f} MB other images "
                     f"(dump had {self.state_pages} pages)")
        if self.post_switch:
            ps = self.post_switch
            lines.append(f"  after the resume: {int(ps.get('pages_filled', 0))} pages filled in "
                         f"{ps.get('fill_s', 0.0) * 1e3:.1f} ms by the lazy-pages daemon, "
                         f"{int(ps.get('faults', 0))} faults (p99 "
                         f"{ps.get('fault_p99_ns', 0.0) / 1e3:.0f} us)")
            if ps.get("postcopy"):
                lines.append(f"  post-copy: {int(ps.get('remote_pages', 0))} pages were left at "
                             f"the source, {int(ps.get('remote_faults', 0))} faults served "
                             f"remotely (p50 {ps.get('remote_fault_p50_ns', 0.0) / 1e6:.2f} ms, "
                             f"p99 {ps.get('remote_fault_p99_ns', 0.0) / 1e6:.2f} ms), "
                             f"all acknowledged {ps.get('push_s', 0.0) * 1e3:.0f} ms after "
                             f"the resume")
        lines.append(f"  downtime {ms(self.downtime_s).strip()} (predicted "
                     f"{ms(self.predicted_downtime_s).strip()}), total {ms(self.total_s).strip()}, "
                     f"{self.bytes_wire_total / 1e6:.2f} MB on the wire")
        for target, t in self.kpi.items():
            met = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            unit = " s" if target.endswith("_s") else " B/s"
            meas = "-" if t["measured"] is None else f"{t['measured']:.3f}{unit}"
            lines.append(f"  target {target} <= {t['target']:g}{unit}: {met} (measured {meas})")
        if self.restored_pid:
            lines.append(f"  restored pid {self.restored_pid} on the destination")
        if self.source_resumed is not None and not self.ok:
            lines.append(f"  source resumed: {self.source_resumed}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)

    def to_prometheus(self, registry=None, prefix: str = "statesync_migration"):
        """Fill (and return) a ``prometheus_client.CollectorRegistry`` with gauges named
        per Prometheus' conventions (base units in the name, no ``_total`` on gauges),
        each labelled ``migration_id``, ``pid``, ``source``, ``destination``,
        ``strategy``:

        ``<prefix>_downtime_seconds``, ``_predicted_downtime_seconds``,
        ``_duration_seconds``, ``_wire_bytes``, ``_state_bytes``, ``_final_bytes``,
        ``_rounds``, ``_success`` (1/0), ``_source_resumed`` (1/0, failed ones),
        ``_kpi_met{target=...}`` (1/0), ``_phase_seconds{phase=...}``,
        ``_round_wire_bytes{round=...}``, ``_post_switch_seconds`` (resume to the last
        page in place), ``_post_switch_faults{served=local|remote}``,
        ``_post_switch_fault_latency_seconds{served=...,quantile=0.5|0.99}`` (lazy and
        post-copy switch-overs), ``_start_timestamp_seconds`` (Unix time;
        with node-exporter's textfile collector, say which run the file describes) and
        ``_info{codec=...,encryption=...}`` (always 1; ``encryption`` is the cipher
        suite, ``hmac-sha256`` when off).
        Raises ImportError if prometheus-client is not installed."""
        from prometheus_client import CollectorRegistry, Gauge

        reg = registry if registry is not None else CollectorRegistry()
        names = ["migration_id", "pid", "source", "destination", "strategy"]
        base = dict(migration_id=self.migration_id or "", pid=str(self.pid),
                    source=self.source or "", destination=self.dest, strategy=self.strategy)
        nan = float("nan")
        for name, doc, value in (
                ("downtime_seconds", "Service downtime (freeze to restored)", self.downtime_s),
                ("predicted_downtime_seconds", "Downtime the engine predicted before the freeze",
                 self.predicted_downtime_s),
                ("duration_seconds", "Total migration time", self.total_s),
                ("wire_bytes", "Bytes sent on the wire", self.bytes_wire_total),
                ("state_bytes", "Bytes of state in the final dump",
                 self.state_pages * self.page_size),
                ("final_bytes", "Bytes on the wire while the process was frozen",
                 self.final_bytes_wire + self.images_bytes),
                ("rounds", "Pre-copy rounds", len(self.rounds)),
                ("success", "1 if the migration succeeded", 1 if self.ok else 0),
                ("source_resumed", "1 if a failed migration left the source running",
                 1 if self.source_resumed else 0),
                ("start_timestamp_seconds", "Unix time the migration started",
                 self.started_at)):
            g = Gauge(f"{prefix}_{name}", doc, names, registry=reg)
            g.labels(**base).set(nan if value is None else value)
        km = Gauge(f"{prefix}_kpi_met", "1 if the KPI target was met, 0 if missed",
                   ["target"] + names, registry=reg)
        for target, t in self.kpi.items():
            if t["met"] is not None:
                km.labels(target=target, **base).set(1 if t["met"] else 0)
        ph = Gauge(f"{prefix}_phase_seconds", "Switch-over phase durations",
                   ["phase"] + names, registry=reg)
        for k, v in self.phases.items():
            ph.labels(phase=k, **base).set(v)
        rb = Gauge(f"{prefix}_round_wire_bytes", "Bytes on the wire per pre-copy round",
                   ["round"] + names, registry=reg)
        for r in self.rounds:
            rb.labels(round=str(r.index), **base).set(r.bytes_wire)
        ps = self.post_switch
        if ps:
            Gauge(f"{prefix}_post_switch_seconds", "Resume to the last page in place (lazy "
                  "fill or post-copy)", names, registry=reg).labels(**base).set(
                float(ps.get("fill_s", nan)))
            remote = float(ps.get("remote_faults", 0.0))
            fg = Gauge(f"{prefix}_post_switch_faults", "Page faults after the resume, by where "
                       "the page came from", ["served"] + names, registry=reg)
            fg.labels(served="local", **base).set(float(ps.get("faults", 0.0)) - remote)
            fg.labels(served="remote", **base).set(remote)
            lg = Gauge(f"{prefix}_post_switch_fault_latency_seconds", "Fault service time "
                       "after the resume", ["served", "quantile"] + names, registry=reg)
            for served, key in (("local", "fault"), ("remote", "remote_fault")):
                for q, qn in (("0.5", "p50"), ("0.99", "p99")):
                    lv = ps.get(f"{key}_{qn}_ns")
                    if lv is not None:
                        lg.labels(served=served, quantile=q, **base).set(float(lv) / 1e9)
        Gauge(f"{prefix}_info", "Always 1; labels: codec and wire encryption used",
              ["codec", "encryption"] + names, registry=reg).labels(
            codec=self.codec, encryption=self.encryption or "unknown", **base).set(1)
        return reg

    def write_prometheus(self, path: str) -> None:
        """Write the metrics in the text exposition format (node-exporter textfile)."""
        from prometheus_client import write_to_textfile
        write_to_textfile(path, self.to_prometheus())
