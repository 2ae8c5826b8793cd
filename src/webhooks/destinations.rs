//! Where webhooks may be sent: a guard against server-side request forgery.
//!
//! A subscription's URL is chosen by an Admin client, and stockd sends it
//! POSTs from inside the deployment's network. So by default stockd refuses
//! every address that is not a public unicast address: loopback,
//! unspecified, link-local (169.254.169.254 is the cloud metadata service),
//! private (RFC 1918, fc00::/7), shared (CGNAT), multicast, broadcast,
//! documentation and benchmarking ranges, and the IPv6 forms that embed one
//! of those IPv4 addresses. `--webhook-allow-networks` lists networks that
//! are allowed anyway, for deployments with internal receivers.
//!
//! The check runs twice: at AddWebhook (on the literal address, or on every
//! address the host name resolves to), and at every delivery on the
//! addresses the connection will use: the HTTP client resolves names only
//! through [`PinnedResolver`], which hands it nothing but checked addresses,
//! so a name that resolves elsewhere later (DNS rebinding) is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// How long resolving a subscription's host may take at AddWebhook.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// IPv4 ranges that are no public unicast destination, the first match
/// naming the refusal (IANA's special-purpose registry, RFC 6890 and later).
const REFUSED_V4: [(Ipv4Net, &str); 17] = [
    (v4(0, 0, 0, 0, 32), "the unspecified address"),
    (v4(0, 0, 0, 0, 8), "a \"this network\" address (0.0.0.0/8)"),
    (v4(10, 0, 0, 0, 8), "a private address (RFC 1918)"),
    (v4(100, 64, 0, 0, 10), "a shared (CGNAT) address"),
    (v4(127, 0, 0, 0, 8), "a loopback address"),
    (v4(169, 254, 0, 0, 16), "a link-local address"),
    (v4(172, 16, 0, 0, 12), "a private address (RFC 1918)"),
    (v4(192, 0, 0, 0, 24), "an IETF protocol assignment"),
    (v4(192, 0, 2, 0, 24), "a documentation address"),
    (v4(192, 88, 99, 0, 24), "a 6to4 relay anycast address"),
    (v4(192, 168, 0, 0, 16), "a private address (RFC 1918)"),
    (v4(198, 18, 0, 0, 15), "a benchmarking address"),
    (v4(198, 51, 100, 0, 24), "a documentation address"),
    (v4(203, 0, 113, 0, 24), "a documentation address"),
    (v4(224, 0, 0, 0, 4), "a multicast address"),
    (v4(255, 255, 255, 255, 32), "the broadcast address"),
    (v4(240, 0, 0, 0, 4), "a reserved address (240.0.0.0/4)"),
];

/// IPv6 ranges refused outright. The forms that embed an IPv4 address are
/// judged by that address instead (see [`embedded_ipv4`]).
const REFUSED_V6: [(Ipv6Net, &str); 12] = [
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "the unspecified address"),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "a loopback address"),
    (v6p(0x64, 0xff9b, 1, 48), "a local-use NAT64 address"),
    (v6p(0x100, 0, 0, 64), "a discard-only address"),
    (v6p(0x2001, 0, 0, 32), "a Teredo address"),
    (v6p(0x2001, 2, 0, 48), "a benchmarking address"),
    (v6p(0x2001, 0xdb8, 0, 32), "a documentation address"),
    (v6p(0x3fff, 0, 0, 20), "a documentation address"),
    (v6p(0xfc00, 0, 0, 7), "a unique local (private) address"),
    (v6p(0xfe80, 0, 0, 10), "a link-local address"),
    (v6p(0xfec0, 0, 0, 10), "a site-local address"),
    (v6p(0xff00, 0, 0, 8), "a multicast address"),
];

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)
}

const fn v6(s: [u16; 8], prefix: u8) -> Ipv6Net {
    Ipv6Net::new_assert(
        Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]),
        prefix,
    )
}

/// A prefix of at most 48 bits: its first three segments.
const fn v6p(a: u16, b: u16, c: u16, prefix: u8) -> Ipv6Net {
    v6([a, b, c, 0, 0, 0, 0, 0], prefix)
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`) or 6to4
/// (`2002:AABB:CCDD::`) address: the one the packets end up at.
fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low32 = Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7]));
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(low32),
        // `::` and `::1` are themselves, not compatible forms of 0.0.0.x.
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
        [0, 0, 0, 0, 0, 0, _, _] => Some(low32),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low32),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))),
        _ => None,
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    REFUSED_V4
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map(|(_, why)| *why)
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    REFUSED_V6
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map(|(_, why)| *why)
}

/// Why a destination was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    #[error(
        "{addr} is {why}; webhooks are not sent there unless \
         --webhook-allow-networks (STOCKD_WEBHOOK_ALLOW_NETWORKS) includes it"
    )]
    Refused { addr: IpAddr, why: String },
    #[error(
        "{host} resolves to {addr}, which is {why}; webhooks are not sent there unless \
             --webhook-allow-networks (STOCKD_WEBHOOK_ALLOW_NETWORKS) includes it"
    )]
    ResolvesToRefused {
        host: String,
        addr: IpAddr,
        why: String,
    },
    #[error("cannot resolve {host}: {reason}")]
    Unresolvable { host: String, reason: String },
    #[error("the URL has no host")]
    NoHost,
}

/// The destination policy: every address refused by the rules above unless
/// an allowed network contains it.
#[derive(Debug, Clone, Default)]
pub struct Destinations {
    allowed: Vec<IpNet>,
}

impl Destinations {
    pub fn new(allowed: Vec<IpNet>) -> Self {
        Self { allowed }
    }

    /// The networks allowed although not public.
    pub fn allowed(&self) -> &[IpNet] {
        &self.allowed
    }

    fn is_allowed(&self, ip: IpAddr) -> bool {
        self.allowed.iter().any(|net| net.contains(&ip))
    }

    /// Ok when webhooks may be sent to `ip`; else what kind of address it is.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        if self.is_allowed(ip) {
            return Ok(());
        }
        match ip {
            IpAddr::V4(v4) => refused_v4(v4).map_or(Ok(()), |why| Err(why.to_owned())),
            IpAddr::V6(v6) => {
                if let Some(why) = refused_v6(v6) {
                    return Err(why.to_owned());
                }
                match embedded_ipv4(v6) {
                    Some(inner) if !self.is_allowed(IpAddr::V4(inner)) => refused_v4(inner)
                        .map_or(Ok(()), |why| Err(format!("a form of {inner}, {why}"))),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Every address of `host` (a name or a literal), each checked; an
    /// error if any one is refused, so a name is either wholly acceptable
    /// or not at all.
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, DestinationError> {
        let unresolvable = |reason: String| DestinationError::Unresolvable {
            host: host.to_owned(),
            reason,
        };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| unresolvable(e.to_string()))?
            .collect();
        if addrs.is_empty() {
            return Err(unresolvable("no address".into()));
        }
        for addr in &addrs {
            self.check_ip(addr.ip())
                .map_err(|why| DestinationError::ResolvesToRefused {
                    host: host.to_owned(),
                    addr: addr.ip(),
                    why,
                })?;
        }
        Ok(addrs)
    }

    /// The literal address of `url`'s host, checked, or None for a name
    /// (which [`PinnedResolver`] checks when it is resolved).
    pub fn check_literal(&self, url: &reqwest::Url) -> Result<Option<IpAddr>, DestinationError> {
        let host = url.host_str().ok_or(DestinationError::NoHost)?;
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let Ok(ip) = bare.parse::<IpAddr>() else {
            return Ok(None);
        };
        self.check_ip(ip)
            .map(|()| Some(ip))
            .map_err(|why| DestinationError::Refused { addr: ip, why })
    }

    /// AddWebhook's check of a URL: its literal address, or every address
    /// its host name resolves to now.
    pub async fn check_url(&self, url: &reqwest::Url) -> Result<(), DestinationError> {
        if self.check_literal(url)?.is_some() {
            return Ok(());
        }
        let host = url.host_str().ok_or(DestinationError::NoHost)?;
        let port = url.port_or_known_default().unwrap_or(0);
        tokio::time::timeout(RESOLVE_TIMEOUT, self.resolve(host, port))
            .await
            .map_err(|_| DestinationError::Unresolvable {
                host: host.to_owned(),
                reason: format!("no answer within {} s", RESOLVE_TIMEOUT.as_secs()),
            })?
            .map(drop)
    }
}

/// The webhook HTTP client's only resolver: it answers with the checked
/// addresses of a name, so the client connects to nothing else.
pub(crate) struct PinnedResolver(pub(crate) Destinations);

impl reqwest::dns::Resolve for PinnedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let destinations = self.0.clone();
        Box::pin(async move {
            // Port 0: the client puts in the URL's port.
            let addrs = destinations.resolve(name.as_str(), 0).await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Parses `--webhook-allow-networks`: comma-separated networks in CIDR
/// notation or single addresses; empty (the default) allows nothing more.
pub fn parse_allowlist(text: &str) -> Result<Destinations, String> {
    let mut allowed = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let net = entry
            .parse::<IpNet>()
            .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                format!("{entry:?} is neither a network (10.1.0.0/16, fd00::/8) nor an address")
            })?;
        allowed.push(net.trunc());
    }
    Ok(Destinations::new(allowed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refuses_every_non_public_range_by_default() {
        let strict = Destinations::default();
        for refused in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "3fff::1",
            "2001:2::1",
            "2001:0:4136:e378::1",
            "100::1",
            "64:ff9b:1::1",
            // IPv4 inside IPv6: mapped, compatible, NAT64, 6to4.
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::ffff:0.0.0.0",
            "::127.0.0.1",
            "::10.1.2.3",
            "64:ff9b::a9fe:a9fe",
            "2002:c0a8:0101::1",
            "2002:7f00:1::",
        ] {
            assert!(strict.check_ip(ip(refused)).is_err(), "{refused} passed");
        }
    }

    #[test]
    fn accepts_public_unicast() {
        let strict = Destinations::default();
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "169.255.0.1",
            "192.0.1.1",
            "198.20.0.1",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(strict.check_ip(ip(public)), Ok(()), "{public}");
        }
    }

    #[test]
    fn names_what_it_refuses() {
        let strict = Destinations::default();
        assert_eq!(
            strict.check_ip(ip("169.254.169.254")).unwrap_err(),
            "a link-local address"
        );
        assert_eq!(
            strict.check_ip(ip("::ffff:127.0.0.1")).unwrap_err(),
            "a form of 127.0.0.1, a loopback address"
        );
        assert_eq!(
            strict.check_ip(ip("0.0.0.0")).unwrap_err(),
            "the unspecified address"
        );
    }

    fn allow(text: &str) -> Destinations {
        parse_allowlist(text).unwrap()
    }

    #[test]
    fn the_allowlist_opens_only_its_networks() {
        let allow = allow("127.0.0.0/8,10.1.0.0/16,fd00::5");
        for allowed in [
            "127.0.0.1",
            "127.1.2.3",
            "10.1.200.3",
            "::ffff:127.0.0.1",
            "fd00::5",
        ] {
            assert_eq!(allow.check_ip(ip(allowed)), Ok(()), "{allowed}");
        }
        for refused in [
            "10.2.0.1",
            "169.254.169.254",
            "::1",
            "fd00::6",
            "192.168.0.1",
        ] {
            assert!(allow.check_ip(ip(refused)).is_err(), "{refused} passed");
        }
    }

    #[test]
    fn allowlists_parse() {
        let nets = |text: &str| {
            parse_allowlist(text).map(|d| {
                d.allowed
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            nets(" 10.1.2.3/16 ,127.0.0.1,::1,").unwrap(),
            ["10.1.0.0/16", "127.0.0.1/32", "::1/128"]
        );
        assert_eq!(nets("0.0.0.0/0,::/0").unwrap(), ["0.0.0.0/0", "::/0"]);
        assert!(nets("").unwrap().is_empty());
        for bad in [
            "localhost",
            "10.0.0.0/33",
            "10.0.0/8",
            "127.0.0.0/8,intranet",
        ] {
            let err = nets(bad).unwrap_err();
            assert!(err.contains(bad.rsplit(',').next().unwrap()), "{err}");
        }
    }

    #[test]
    fn literal_hosts_are_checked_names_are_left_to_the_resolver() {
        let strict = Destinations::default();
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        assert_eq!(
            strict.check_literal(&url("http://8.8.8.8/x")),
            Ok(Some(ip("8.8.8.8")))
        );
        assert_eq!(
            strict.check_literal(&url("https://shop.example/x")),
            Ok(None)
        );
        for refused in [
            "http://127.0.0.1:8080/",
            "http://[::1]/",
            "http://[::ffff:7f00:1]/",
            // The URL parser reads these IPv4 spellings as 127.0.0.1.
            "http://2130706433/",
            "http://0x7f.1/",
            "http://127.1/",
        ] {
            assert!(
                matches!(
                    strict.check_literal(&url(refused)),
                    Err(DestinationError::Refused { .. })
                ),
                "{refused}"
            );
        }
    }

    #[tokio::test]
    async fn names_are_judged_by_what_they_resolve_to() {
        let strict = Destinations::default();
        let err = strict.resolve("localhost", 80).await.unwrap_err();
        assert!(
            matches!(&err, DestinationError::ResolvesToRefused { addr, .. } if addr.is_loopback()),
            "{err}"
        );
        let addrs = allow("127.0.0.0/8,::1")
            .resolve("localhost", 80)
            .await
            .unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 80));
    }

    #[tokio::test]
    async fn the_pinned_resolver_answers_only_with_checked_addresses() {
        use reqwest::dns::Resolve;
        let name = |s: &str| s.parse::<reqwest::dns::Name>().unwrap();
        let refused = PinnedResolver(Destinations::default())
            .resolve(name("localhost"))
            .await;
        let err = refused.err().expect("localhost is refused").to_string();
        assert!(err.contains("loopback"), "{err}");
        let allowed = PinnedResolver(allow("127.0.0.0/8,::1"))
            .resolve(name("localhost"))
            .await
            .map_err(|e| e.to_string())
            .unwrap();
        assert!(allowed.into_iter().all(|a| a.ip().is_loopback()));
    }
}
