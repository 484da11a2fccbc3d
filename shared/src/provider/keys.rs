//! TODO(helper): keys
