"""The eBPF side: loads bpf/ipvslb.bpf.c with bcc and reads what it saw.

`loader` attaches the program and drains it; `btf` finds kernel struct offsets; `records`
decodes ring-buffer records into events; `ringbuf` reads the ring buffer's memory mapping;
`paircounts` reads the per-(VIP, backend) counters; `conntable` maps IPVS connections back
to their backend when the program cannot see it.
"""
from ipvslb.tracer.loader import Tracer, TracerSettings, TracerUnavailable

__all__ = ["Tracer", "TracerSettings", "TracerUnavailable"]
