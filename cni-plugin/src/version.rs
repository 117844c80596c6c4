//! CNI spec versions: which ones nodeplane speaks and what each allows.

use crate::error::{Error, Result};

/// A CNI spec version this plugin accepts in a network configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

/// Every version nodeplane accepts, oldest first, as VERSION reports them.
pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

impl Version {
    pub const LATEST: Version = Version::V1_1_0;

    pub fn parse(s: &str) -> Result<Version> {
        Ok(match s {
            "0.3.0" => Version::V0_3_0,
            "0.3.1" => Version::V0_3_1,
            "0.4.0" => Version::V0_4_0,
            "1.0.0" => Version::V1_0_0,
            "1.1.0" => Version::V1_1_0,
            other => {
                return Err(Error::Version {
                    version: other.to_string(),
                    supported: SUPPORTED.join(", "),
                })
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }

    /// Results before 1.0.0 carry `"version": "4"|"6"` on each IP.
    pub fn ips_carry_version(self) -> bool {
        self < Version::V1_0_0
    }

    /// 1.1.0 added interface mtu/socketPath/pciID and route mtu/advmss/priority/table/scope.
    pub fn has_1_1_fields(self) -> bool {
        self >= Version::V1_1_0
    }

    /// Fails unless this version defines `verb` (CHECK arrived in 0.4.0,
    /// GC and STATUS in 1.1.0), as the spec's reference skeleton does.
    pub fn require(self, verb: &'static str, minimum: Version) -> Result<()> {
        if self < minimum {
            return Err(Error::VerbVersion {
                verb,
                minimum: minimum.as_str(),
                version: self.as_str().to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_supported_version_and_round_trips() {
        for s in SUPPORTED {
            assert_eq!(Version::parse(s).expect("supported").as_str(), s);
        }
    }

    #[test]
    fn rejects_unknown_versions_with_code_1() {
        for s in ["0.1.0", "0.2.0", "2.0.0", "", "1.1"] {
            let e = Version::parse(s).expect_err("must reject");
            assert_eq!(e.code(), 1, "{s}");
            assert!(
                e.to_string().contains("1.1.0"),
                "message lists the supported versions"
            );
        }
    }

    #[test]
    fn verbs_are_gated_by_version() {
        assert!(Version::V0_3_1.require("CHECK", Version::V0_4_0).is_err());
        assert!(Version::V0_4_0.require("CHECK", Version::V0_4_0).is_ok());
        assert!(Version::V1_0_0.require("GC", Version::V1_1_0).is_err());
    }
}
