//! TODO(helper): shengpay
