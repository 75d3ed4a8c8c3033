//! Who may open which export: the NBD server asks a [`Gate`] for every
//! export it lists or opens, with what it knows of the client (address,
//! verified certificate names, whether TLS is on).
//!
//! [`AccessRules`] is the gate built from `[[access]]` in `pool.toml`.
//! Without any rule every client may open every export read-write (what
//! keyturn did before access control existed); with one or more, an export
//! is open only to the clients a rule names, and the strongest matching
//! grant wins.

#![forbid(unsafe_code)]

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// What the server knows of a client when it decides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Client {
    /// Its IP address (`None` on a Unix socket).
    pub addr: Option<IpAddr>,
    /// Names of its verified certificate (common names, then SANs);
    /// empty without TLS or without a client certificate.
    pub names: Vec<String>,
    /// Whether the connection is running TLS.
    pub tls: bool,
}

impl Client {
    /// How the client is named in logs and audit records: its first
    /// certificate name, else `anonymous`.
    pub fn identity(&self) -> &str {
        self.names.first().map_or("anonymous", String::as_str)
    }
}

/// What a client may do with an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Reads only: the export is flagged read-only, writes get `EPERM`.
    ReadOnly,
    /// Reads and writes.
    ReadWrite,
}

/// Decides access; implemented by [`AccessRules`], and by anything a test
/// or an embedding server wants.
pub trait Gate: Send + Sync + 'static {
    /// The access `client` has to `export`, or `None` if it may not see it.
    fn access(&self, client: &Client, export: &str) -> Option<Access>;

    /// Called once when a connection that was refused something ends:
    /// `refused` holds what it asked for and was denied (export names, or
    /// the reason its TLS handshake failed). For an audit record.
    fn refused(&self, client: &Client, refused: &[String]);
}

/// One `[[access]]` rule of `pool.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// Export (volume) names; `"*"` is every export.
    pub exports: Vec<String>,
    /// Certificate names (subject CN, or a DNS, e-mail, URI or IP SAN) of
    /// the clients it grants; `"*"` is any client with a verified
    /// certificate. Omitted: any client, with or without a certificate
    /// (then `addresses` is the only check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<Vec<String>>,
    /// What they may do.
    #[serde(default = "default_access")]
    pub access: Access,
    /// Addresses or networks (`10.1.0.0/16`, `::1`) the client must come
    /// from. Omitted: any address (and Unix sockets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<String>>,
}

fn default_access() -> Access {
    Access::ReadWrite
}

/// A rule's address list that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("[[access]] address {0:?} is not an IP address or network")]
pub struct BadAddress(pub String);

#[derive(Clone, Debug)]
struct Rule {
    exports: Vec<String>,
    clients: Option<Vec<String>>,
    access: Access,
    nets: Option<Vec<IpNet>>,
}

impl Rule {
    fn parse(r: &AccessRule) -> Result<Self, BadAddress> {
        let nets = match &r.addresses {
            None => None,
            Some(list) => Some(
                list.iter()
                    .map(|a| {
                        a.parse::<IpNet>()
                            .or_else(|_| a.parse::<IpAddr>().map(IpNet::from))
                            .map_err(|_| BadAddress(a.clone()))
                    })
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(Rule {
            exports: r.exports.clone(),
            clients: r.clients.clone(),
            access: r.access,
            nets,
        })
    }

    fn grants(&self, client: &Client, export: &str) -> bool {
        let export_ok = self.exports.iter().any(|e| e == "*" || e == export);
        let client_ok = match &self.clients {
            None => true,
            Some(names) => names.iter().any(|n| {
                (n == "*" && !client.names.is_empty()) || client.names.iter().any(|c| c == n)
            }),
        };
        let addr_ok = match (&self.nets, client.addr) {
            (None, _) => true,
            (Some(nets), Some(ip)) => nets.iter().any(|n| n.contains(&canonical(ip))),
            // A Unix-socket client has no address to match.
            (Some(_), None) => false,
        };
        export_ok && client_ok && addr_ok
    }
}

/// An IPv4-mapped IPv6 address (a v4 client on a dual-stack socket) as v4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The decision part of the `[[access]]` rules, without side effects.
#[derive(Clone, Debug, Default)]
pub struct AccessRules {
    rules: Vec<Rule>,
}

impl AccessRules {
    /// Checks and compiles the rules.
    pub fn new(rules: &[AccessRule]) -> Result<Self, BadAddress> {
        Ok(AccessRules {
            rules: rules.iter().map(Rule::parse).collect::<Result<_, _>>()?,
        })
    }

    /// Whether there are no rules (every client may open everything).
    pub fn is_open(&self) -> bool {
        self.rules.is_empty()
    }

    /// The strongest access any rule gives `client` to `export`.
    pub fn decide(&self, client: &Client, export: &str) -> Option<Access> {
        if self.rules.is_empty() {
            return Some(Access::ReadWrite);
        }
        self.rules
            .iter()
            .filter(|r| r.grants(client, export))
            .map(|r| r.access)
            .max()
    }
}

/// Callback for a refused client (see [`Gate::refused`]).
pub type OnRefused = Box<dyn Fn(&Client, &[String]) + Send + Sync>;

/// A [`Gate`] from [`AccessRules`] that can be replaced while serving
/// (on SIGHUP), and reports refusals to a callback (the audit log).
pub struct RulesGate {
    rules: parking_lot::RwLock<AccessRules>,
    on_refused: OnRefused,
}

impl RulesGate {
    /// A gate with `rules`, reporting refused clients to `on_refused`.
    pub fn new(rules: AccessRules, on_refused: OnRefused) -> Self {
        RulesGate {
            rules: parking_lot::RwLock::new(rules),
            on_refused,
        }
    }

    /// Replaces the rules; connections decide with the new ones from their
    /// next option on (an export already open stays open).
    pub fn replace(&self, rules: AccessRules) {
        *self.rules.write() = rules;
    }
}

impl Gate for RulesGate {
    fn access(&self, client: &Client, export: &str) -> Option<Access> {
        self.rules.read().decide(client, export)
    }

    fn refused(&self, client: &Client, refused: &[String]) {
        (self.on_refused)(client, refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(exports: &[&str], clients: Option<&[&str]>, access: Access) -> AccessRule {
        AccessRule {
            exports: exports.iter().map(|s| s.to_string()).collect(),
            clients: clients.map(|c| c.iter().map(|s| s.to_string()).collect()),
            access,
            addresses: None,
        }
    }

    fn client(names: &[&str], addr: &str) -> Client {
        Client {
            addr: Some(addr.parse().unwrap()),
            names: names.iter().map(|s| s.to_string()).collect(),
            tls: !names.is_empty(),
        }
    }

    #[test]
    fn no_rules_opens_everything() {
        let r = AccessRules::new(&[]).unwrap();
        assert_eq!(r.decide(&Client::default(), "any"), Some(Access::ReadWrite));
    }

    #[test]
    fn names_exports_and_strongest_grant() {
        let r = AccessRules::new(&[
            rule(&["a"], Some(&["client-a"]), Access::ReadWrite),
            rule(&["b"], Some(&["client-a", "client-b"]), Access::ReadOnly),
            rule(&["b"], Some(&["client-b"]), Access::ReadWrite),
        ])
        .unwrap();
        let a = client(&["client-a"], "127.0.0.1");
        let b = client(&["client-b", "b.example"], "127.0.0.1");
        assert_eq!(r.decide(&a, "a"), Some(Access::ReadWrite));
        assert_eq!(r.decide(&a, "b"), Some(Access::ReadOnly));
        assert_eq!(r.decide(&b, "a"), None);
        assert_eq!(r.decide(&b, "b"), Some(Access::ReadWrite));
        assert_eq!(r.decide(&client(&[], "127.0.0.1"), "a"), None);
    }

    #[test]
    fn star_needs_a_certificate_and_omitted_clients_do_not() {
        let r = AccessRules::new(&[
            rule(&["*"], Some(&["*"]), Access::ReadOnly),
            rule(&["open"], None, Access::ReadWrite),
        ])
        .unwrap();
        assert_eq!(
            r.decide(&client(&["x"], "127.0.0.1"), "v"),
            Some(Access::ReadOnly)
        );
        assert_eq!(r.decide(&client(&[], "127.0.0.1"), "v"), None);
        assert_eq!(
            r.decide(&client(&[], "127.0.0.1"), "open"),
            Some(Access::ReadWrite)
        );
    }

    #[test]
    fn address_lists() {
        let mut r = rule(&["v"], None, Access::ReadWrite);
        r.addresses = Some(vec!["10.1.0.0/16".into(), "::1".into()]);
        let rules = AccessRules::new(&[r]).unwrap();
        assert!(rules.decide(&client(&[], "10.1.2.3"), "v").is_some());
        assert!(rules.decide(&client(&[], "::ffff:10.1.2.3"), "v").is_some());
        assert!(rules.decide(&client(&[], "::1"), "v").is_some());
        assert!(rules.decide(&client(&[], "10.2.0.1"), "v").is_none());
        let unix = Client::default();
        assert!(rules.decide(&unix, "v").is_none());
        let mut bad = rule(&["v"], None, Access::ReadOnly);
        bad.addresses = Some(vec!["10.1.0.0/33".into()]);
        assert!(AccessRules::new(&[bad]).is_err());
    }
}
