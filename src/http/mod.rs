//! The one place where the gateway's answers become HTTP: `error` maps every error to its status
//! and JSON body, `respond` turns decisions (allowed, 402, 429, shadow) into responses with their
//! rate-limit headers. `/v1/check` and the proxy both answer through here, so a denial is the
//! same bytes whichever way it reached the gateway.

pub mod error;
pub mod respond;
