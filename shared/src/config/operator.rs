//! `[operator]`: how operators' resolutions and corrections take effect (DESIGN §8, §9).

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[operator]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct OperatorConfig {
    /// How many different people a `job resolve` or `job correct` takes: 2 (the default) is
    /// four eyes, the requester and a second operator who approves; 1 applies it at once, for
    /// development.
    pub approvals_required: u8,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            approvals_required: 2,
        }
    }
}

impl OperatorConfig {
    /// Whether a resolution or correction waits for a second operator.
    pub fn four_eyes(&self) -> bool {
        self.approvals_required >= 2
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        // A third signature would need a request to collect approvals one by one; nobody has
        // asked for it, and a value that silently meant 2 would mislead.
        if !matches!(self.approvals_required, 1 | 2) {
            return Err(ConfigError::invalid(
                "operator.approvals_required",
                "must be 1 (apply at once, development only) or 2 (a second operator approves)",
            ));
        }
        Ok(())
    }
}
