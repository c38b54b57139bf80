//! `ha-pki`: the cluster CA, certificates, join tokens and mutual TLS for every gRPC connection.
