"""In-process stand-ins for what the core drives, so that it has fast unit
tests without QEMU or a guest (as Kata's virtcontainers tests have their
mock hypervisor): a fake VM (vm.py) that serves a fake agent (agent.py),
which is the real agent's server and service over host processes."""
