//! Cluster test helpers: process management, ports, clients.
