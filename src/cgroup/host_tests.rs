//! Tests on the real cgroup hierarchies of this host.
