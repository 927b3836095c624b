"""A simulated board's offload link: link emulators to the lab's edge servers, and the power it draws
while an exchange is in flight over them.

The seed paper measured whole devices while offloading (Table 3, §4.2.1); a family's `links:` give
that power per link kind (devices/<family>.yaml). The simulated lab puts one link emulator
(labbench.edge.link.Link) between each board with a `link:` and each edge server, shaped with the
board's figures; a board sends its offloads to the emulator's address (`link_address` on the control
socket) and draws the link's power while one is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from labbench.edge.link import Link, LinkProfile


@dataclass
class Radio:
    kind: str  # wifi, ble, ethernet
    power_w: float  # the whole board's draw while an exchange is in flight
    profile: LinkProfile
    links: dict[str, Link] = field(default_factory=dict)  # by edge server name

    def in_flight_s(self, t0: float, t1: float) -> float:
        """Seconds within [t0, t1] with an exchange in flight on any of the board's links (a board
        offloads one sample at a time, so they do not overlap)."""
        return min(t1 - t0, sum(link.in_flight.seconds(t0, t1) for link in self.links.values()))

    def set(self, **changes: float | None) -> None:
        """Reshape every link of the board (both directions), e.g. `set(latency_s=0.05, loss=0.01)`."""
        for link in self.links.values():
            link.set("both", **changes)

    def stop(self) -> None:
        for link in self.links.values():
            link.close()
