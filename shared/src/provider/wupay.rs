//! TODO(helper): wupay
