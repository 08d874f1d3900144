//! TLS for `NBD_OPT_STARTTLS`: the shared r3map TLS configurations (crate `r3map-tls`),
//! re-exported so `r3map_nbd::tls::…` keeps working.

pub use r3map_tls::*;
