"""Hierarchical inference strategies (seed 004), pure computation: the decision modules that accept
or offload a local inference (`decision`), HI accuracy, latency and energy from modular
measurements with their uncertainties (`predict`, the paper's Eq. 1-4), and QoS requirements with
the preferred strategy per requirement (`qos`, the paper's Table 5). No drivers, sims or pytest."""
