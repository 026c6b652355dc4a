//! HTTP layers shared by the inbound and outbound sides, in the order a
//! request meets them: headers, route, retry (and timeouts).

pub mod headers;
pub mod observe;
pub mod retry;
pub mod route;
pub mod upgrade;
