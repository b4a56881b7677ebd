"""Prometheus text-format metrics without a client library: a few counters and a histogram."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # by (route, status code)
        self.disconnects = 0
        self.errors: dict[str, int] = defaultdict(int)  # by OpenAI error type
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)  # (model, kind)
        self.batches = 0
        self.batched_requests = 0
        self.latency_counts = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_n = 0

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Every response of every route, errors included; latency for chat completions."""
        with self._lock:
            self.requests[(route, str(status))] += 1
            if route != "/v1/chat/completions":
                return
            self.latency_sum += seconds
            self.latency_n += 1
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.latency_counts[i] += 1

    def observe_disconnect(self) -> None:
        with self._lock:
            self.disconnects += 1

    def observe_error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def observe_usage(self, usage) -> None:
        with self._lock:
            for model, part in (("capable", usage.capable), ("light", usage.light)):
                self.tokens[(model, "prompt")] += part.prompt_tokens
                self.tokens[(model, "output")] += part.output_tokens

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.batched_requests += size

    def render(self) -> str:
        with self._lock:
            lines = counter(
                "duet_requests_total",
                "Requests by route and HTTP status (unknown routes: route=other).",
                {f'route="{r}",status="{s}"': n for (r, s), n in sorted(self.requests.items())},
            )
            lines += counter(
                "duet_client_disconnects_total",
                "Requests whose client left before the answer; their work is cancelled.",
                {"": self.disconnects},
            )
            lines += counter(
                "duet_errors_total",
                "Errors by type.",
                {f'type="{t}"': n for t, n in sorted(self.errors.items())},
            )
            lines += counter(
                "duet_tokens_total",
                "Tokens by model and kind.",
                {f'model="{m}",kind="{k}"': n for (m, k), n in sorted(self.tokens.items())},
            )
            lines += counter("duet_batches_total", "Protocol batches run.", {"": self.batches})
            lines += counter(
                "duet_batched_requests_total", "Requests served through batches.", {"": self.batched_requests}
            )
            lines += [
                "# HELP duet_request_latency_seconds Chat completion latency.",
                "# TYPE duet_request_latency_seconds histogram",
            ]
            for bound, count in zip(LATENCY_BUCKETS, self.latency_counts, strict=True):
                label = "+Inf" if bound == float("inf") else f"{bound}"
                lines.append(f'duet_request_latency_seconds_bucket{{le="{label}"}} {count}')
            lines += [
                f"duet_request_latency_seconds_sum {self.latency_sum}",
                f"duet_request_latency_seconds_count {self.latency_n}",
            ]
        return "\n".join(lines) + "\n"


def counter(name: str, description: str, samples: dict[str, int]) -> list[str]:
    """One counter in the text format; `samples` maps a label set ("" for none) to its value."""
    lines = [f"# HELP {name} {description}", f"# TYPE {name} counter"]
    return lines + [f"{name}{{{labels}}} {n}" if labels else f"{name} {n}" for labels, n in samples.items()]
