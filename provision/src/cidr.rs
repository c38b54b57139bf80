//! IPv4 networks in CIDR form (`192.168.1.8/29`).
//!
//! Invariant: an [`Ipv4Cidr`] always holds the network address (host bits zero) and a prefix
//! length of at most 32, so two values describing the same network compare equal and
//! [`Ipv4Cidr::overlaps`] is a pure comparison of ranges.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a CIDR string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not of the form `a.b.c.d/n`.
    #[error("`{0}` is not an IPv4 network in CIDR form (a.b.c.d/n)")]
    Syntax(String),
    /// The prefix length is above 32.
    #[error("`{0}`: prefix length must be at most 32")]
    Prefix(String),
    /// Host bits are set: the author probably meant a different network.
    #[error("`{given}` has host bits set; the network address is {network}")]
    HostBits {
        /// The text as written.
        given: String,
        /// The network it would denote with host bits cleared.
        network: String,
    },
}

/// An IPv4 network: a network address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// The network `network/prefix`; fails when host bits are set or `prefix > 32`.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self, CidrError> {
        let text = format!("{network}/{prefix}");
        if prefix > 32 {
            return Err(CidrError::Prefix(text));
        }
        let masked = Ipv4Addr::from(u32::from(network) & mask(prefix));
        if masked != network {
            return Err(CidrError::HostBits {
                given: text,
                network: format!("{masked}/{prefix}"),
            });
        }
        Ok(Self { network, prefix })
    }

    /// A single host as a `/32` network.
    pub fn host(address: Ipv4Addr) -> Self {
        Self {
            network: address,
            prefix: 32,
        }
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The broadcast address (the last address of the range).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }

    /// Whether `address` lies inside this network (network and broadcast included).
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & mask(self.prefix) == u32::from(self.network)
    }

    /// Whether `address` can be given to a host: inside the range and, for prefixes shorter
    /// than /31, neither the network nor the broadcast address.
    pub fn is_host_address(&self, address: Ipv4Addr) -> bool {
        self.contains(address)
            && (self.prefix >= 31 || (address != self.network && address != self.broadcast()))
    }

    /// Whether the two networks share at least one address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }
}

/// The netmask of a prefix length as a host-order integer.
fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| CidrError::Syntax(s.to_owned()))?;
        let network: Ipv4Addr = addr.parse().map_err(|_| CidrError::Syntax(s.to_owned()))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| CidrError::Syntax(s.to_owned()))?;
        Self::new(network, prefix)
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = CidrError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Ipv4Cidr> for String {
    fn from(value: Ipv4Cidr) -> Self {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_and_checks_ranges() {
        let backend: Ipv4Cidr = "192.168.1.8/29".parse().unwrap();
        assert_eq!(backend.broadcast(), Ipv4Addr::new(192, 168, 1, 15));
        assert!(backend.is_host_address(Ipv4Addr::new(192, 168, 1, 9)));
        assert!(!backend.is_host_address(Ipv4Addr::new(192, 168, 1, 8)));
        assert!(!backend.is_host_address(Ipv4Addr::new(192, 168, 1, 15)));
        assert!(!backend.contains(Ipv4Addr::new(192, 168, 1, 16)));
        let dmz: Ipv4Cidr = "192.168.1.0/29".parse().unwrap();
        assert!(!dmz.overlaps(&backend));
        let wide: Ipv4Cidr = "192.168.1.0/24".parse().unwrap();
        assert!(wide.overlaps(&backend) && backend.overlaps(&wide));
    }

    #[test]
    fn refuses_host_bits_and_garbage() {
        assert_eq!(
            "192.168.1.9/29".parse::<Ipv4Cidr>(),
            Err(CidrError::HostBits {
                given: "192.168.1.9/29".into(),
                network: "192.168.1.8/29".into()
            })
        );
        assert!(matches!(
            "192.168.1.0/33".parse::<Ipv4Cidr>(),
            Err(CidrError::Prefix(_))
        ));
        assert!(matches!(
            "192.168.1.0".parse::<Ipv4Cidr>(),
            Err(CidrError::Syntax(_))
        ));
    }
}
