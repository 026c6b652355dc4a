//! HTTP layers shared by the inbound and outbound sides, in the order a
//! request meets them: headers, route, retry (and timeouts), and what
//! becomes of a request body the next hop stopped reading (drain).

pub mod drain;
pub mod headers;
pub mod observe;
pub mod retry;
pub mod route;
pub mod upgrade;
