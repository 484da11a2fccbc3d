//! Provider code tables as data.
//!
//! Each provider has a default table (DESIGN §5) mapping its error codes to a [`CodeClass`];
//! config may add or override rows. Keeping the table as data, not as `match` arms spread over
//! the clients, lets finance and SREs read and change the policy without reading protocol code,
//! and lets one test fixture per row prove it.

use std::collections::BTreeMap;

use super::CodeClass;

/// A provider's code table: explicit rows plus the class for codes not in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeTable {
    rows: BTreeMap<String, CodeClass>,
    unknown: CodeClass,
}

impl CodeTable {
    /// A table from rows and the class for unknown codes.
    pub fn new<I, S>(rows: I, unknown: CodeClass) -> Self
    where
        I: IntoIterator<Item = (S, CodeClass)>,
        S: Into<String>,
    {
        Self {
            rows: rows.into_iter().map(|(c, k)| (c.into(), k)).collect(),
            unknown,
        }
    }

    /// ShengPay's default table (DESIGN §5); unknown codes on `resultCode` FAIL are declines.
    pub fn shengpay_default() -> Self {
        use CodeClass::*;
        Self::new(
            [
                ("BIZERR_NEED_RETRY", RetryLater),
                ("SYSTEMERROR", RetryLater),
                ("FREQUENCY_LIMITED", RetryLater),
                ("REFUND_AMOUNT_ERROR", Declined),
                ("ORDER_NOT_REFUNDABLE", Declined),
                ("ORDER_NOT_EXIST", Declined),
                ("NOTENOUGH", Declined),
                ("TRADE_OVERDUE", Declined),
                ("SIGN_ERROR", RequestRejected),
                ("LACK_PARAMS", RequestRejected),
                ("PARAMS_ERROR", RequestRejected),
                ("MCH_NOT_FOUND", RequestRejected),
                ("SERVICE_PROVIDER_NO_AUTH", RequestRejected),
            ],
            Declined,
        )
    }

    /// Returns this table with `overrides` applied on top (config wins).
    pub fn with_overrides(mut self, overrides: &BTreeMap<String, CodeClass>) -> Self {
        for (code, class) in overrides {
            self.rows.insert(code.clone(), *class);
        }
        self
    }

    /// The class of a code.
    pub fn classify(&self, code: &str) -> CodeClass {
        self.rows.get(code).copied().unwrap_or(self.unknown)
    }

    /// Every explicit row, in code order.
    pub fn rows(&self) -> impl Iterator<Item = (&str, CodeClass)> {
        self.rows.iter().map(|(c, k)| (c.as_str(), *k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_overrides_replace_default_rows_and_add_new_ones() {
        let mut o = BTreeMap::new();
        o.insert("SYSTEMERROR".to_owned(), CodeClass::Declined);
        o.insert("NEW_CODE".to_owned(), CodeClass::RetryLater);
        let t = CodeTable::shengpay_default().with_overrides(&o);
        assert_eq!(t.classify("SYSTEMERROR"), CodeClass::Declined);
        assert_eq!(t.classify("NEW_CODE"), CodeClass::RetryLater);
        assert_eq!(t.classify("NOTENOUGH"), CodeClass::Declined);
    }

    #[test]
    fn unknown_shengpay_codes_are_declines() {
        assert_eq!(
            CodeTable::shengpay_default().classify("SOMETHING_NEW"),
            CodeClass::Declined
        );
    }
}
