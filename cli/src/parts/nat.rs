//! `vipgate run` / `show nat` for this capability.

use super::{Part, StartCtx, not_built_yet};
use crate::config::SiteConfig;

/// Starts this capability's parts.
///
/// # Errors
/// Always, until the capability lands.
pub(crate) async fn start(
    _site: &SiteConfig,
    _ctx: &StartCtx,
) -> anyhow::Result<Vec<Box<dyn Part>>> {
    Err(not_built_yet("nat"))
}

/// Human text for `vipgate show nat`.
pub(crate) fn render(items: &[serde_json::Value]) -> String {
    items.iter().map(|i| format!("{i}\n")).collect()
}
