//! The gate in front of the handshake: what an unauthenticated peer may cost.
//!
//! Anyone who reaches the UDP port can start handshakes. The gate bounds how many are in
//! progress at once, in all and from one IP address, and once half the room is taken asks
//! a peer whose address QUIC has not validated to prove it first (a stateless Retry: a
//! spoofed source cannot answer it, and it costs the coordinator nothing to send). Pure
//! bookkeeping: the shell asks [`Gate::admit`] for each incoming connection and drops the
//! [`Ticket`] when the handshake ends, however it ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use fedward_shared::config::Admission;

/// What to do with an incoming connection.
#[derive(Debug)]
pub enum Verdict {
    /// Go on with the handshake, holding the ticket until it ends.
    Accept(Ticket),
    /// Ask the peer to validate its address first (QUIC Retry).
    Retry,
    /// Refuse: too many handshakes in progress, in all or from this address.
    Refuse { reason: &'static str },
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Counts handshakes in progress.
#[derive(Clone, Debug)]
pub struct Gate {
    limits: Admission,
    counts: Arc<Mutex<Counts>>,
}

/// One handshake in progress; dropping it frees its place.
#[derive(Debug)]
pub struct Ticket {
    ip: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl Gate {
    pub fn new(limits: Admission) -> Self {
        Self { limits, counts: Arc::default() }
    }

    /// Decides on a connection from `ip`; `validated` is whether QUIC has already
    /// validated its address (it answered a Retry).
    pub fn admit(&self, ip: IpAddr, validated: bool) -> Verdict {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.total >= self.limits.max_handshakes {
            return Verdict::Refuse { reason: "too many handshakes in progress" };
        }
        if counts.per_ip.get(&ip).copied().unwrap_or(0) >= self.limits.max_handshakes_per_ip {
            return Verdict::Refuse { reason: "too many handshakes in progress from this address" };
        }
        if !validated && counts.total * 2 >= self.limits.max_handshakes {
            return Verdict::Retry;
        }
        counts.total += 1;
        *counts.per_ip.entry(ip).or_default() += 1;
        Verdict::Accept(Ticket { ip, counts: self.counts.clone() })
    }

    /// Handshakes in progress now.
    pub fn in_progress(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                // Forgotten once idle, so a flood from many addresses leaves nothing behind.
                counts.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(total: usize, per_ip: usize) -> Gate {
        Gate::new(Admission { max_handshakes: total, max_handshakes_per_ip: per_ip, ..Admission::default() })
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn bounds_handshakes_in_all_and_per_address_and_frees_them() {
        let g = gate(4, 2);
        let a1 = g.admit(ip(1), true);
        let a2 = g.admit(ip(1), true);
        assert!(matches!((&a1, &a2), (Verdict::Accept(_), Verdict::Accept(_))));
        assert!(matches!(g.admit(ip(1), true), Verdict::Refuse { .. }), "a third from one address");
        let b1 = g.admit(ip(2), true);
        let b2 = g.admit(ip(3), true);
        assert_eq!(g.in_progress(), 4);
        assert!(matches!(g.admit(ip(4), true), Verdict::Refuse { .. }), "the room is full");
        drop((a1, a2, b1, b2));
        assert_eq!(g.in_progress(), 0);
        assert!(g.counts.lock().unwrap().per_ip.is_empty(), "nothing left behind");
        assert!(matches!(g.admit(ip(1), true), Verdict::Accept(_)));
    }

    #[test]
    fn asks_unvalidated_peers_to_retry_once_half_full() {
        let g = gate(4, 4);
        let held: Vec<Verdict> = (1..=2).map(|n| g.admit(ip(n), false)).collect();
        assert!(held.iter().all(|v| matches!(v, Verdict::Accept(_))));
        assert!(matches!(g.admit(ip(9), false), Verdict::Retry));
        assert!(matches!(g.admit(ip(9), true), Verdict::Accept(_)), "a validated address gets in");
    }
}
