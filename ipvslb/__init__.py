"""ipvslb: client-side layer-4 load balancing with kernel IPVS and eBPF evidence."""

__version__ = "0.1.0"
