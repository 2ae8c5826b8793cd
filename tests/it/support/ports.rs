//! Free local ports, for the servers a test starts itself (a Redis, a
//! stockd process, a metrics endpoint). The port is free when asked; the
//! server that binds it next is the test's.

/// A local TCP port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
