//! vCPU thread confinement in cgroups (v1 and v2).
