//! A throw-away PKI made with `openssl` for TLS tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// openssl options for a new P-256 key without a passphrase.
const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";

/// A throw-away PKI under one directory: `NAME-cert.pem` / `NAME-key.pem`.
pub struct Pki {
    /// The directory holding every file.
    pub dir: PathBuf,
}

impl Pki {
    /// A PKI in `dir` (created).
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        Pki { dir: dir.to_owned() }
    }

    /// `NAME-cert.pem`.
    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-cert.pem"))
    }

    /// `NAME-key.pem`.
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-key.pem"))
    }

    /// Runs openssl in the PKI directory; `args` is split on whitespace.
    pub fn openssl(&self, args: &str) {
        let args: Vec<&str> = args.split_whitespace().collect();
        let out = Command::new("openssl").args(&args).current_dir(&self.dir).output().expect("spawn openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A self-signed CA.
    pub fn ca(&self, name: &str) -> &Self {
        self.openssl(&format!(
            "req -x509 {NEW_KEY} -days 2 -subj /CN=test-{name} -keyout {name}-key.pem -out {name}-cert.pem \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
        ));
        self
    }

    /// A leaf certificate signed by `ca`, with extensions `ext` (one per
    /// line), valid for `days` ("-1" makes an expired one).
    pub fn leaf(&self, name: &str, ca: &str, ext: &str, days: &str) -> &Self {
        std::fs::write(self.dir.join(format!("{name}.ext")), ext).unwrap();
        self.openssl(&format!("req {NEW_KEY} -subj /CN={name} -keyout {name}-key.pem -out {name}.csr"));
        let serial = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        self.openssl(&format!(
            "x509 -req -in {name}.csr -CA {ca}-cert.pem -CAkey {ca}-key.pem -set_serial 0x{serial:x} -days {days} \
             -extfile {name}.ext -out {name}-cert.pem"
        ));
        self
    }

    /// A server certificate for `localhost` / `127.0.0.1`.
    pub fn server(&self, name: &str, ca: &str) -> &Self {
        self.leaf(
            name,
            ca,
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
            "2",
        )
    }

    /// A client certificate (valid for `days`; "-1" makes an expired one).
    pub fn client(&self, name: &str, ca: &str, days: &str) -> &Self {
        self.leaf(name, ca, "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n", days)
    }

    /// A credentials directory as qemu (`tls-creds-x509,dir=`) and libnbd
    /// (`tls-certificates=`) read it: `ca-cert.pem` holds the CAs `cas`,
    /// plus `client-cert.pem`/`client-key.pem` if `client` is given.
    pub fn creds(&self, dir: &str, cas: &[&str], client: Option<&str>) -> PathBuf {
        let d = self.dir.join(dir);
        std::fs::create_dir_all(&d).unwrap();
        let bundle: Vec<u8> = cas.iter().flat_map(|ca| std::fs::read(self.cert(ca)).unwrap()).collect();
        std::fs::write(d.join("ca-cert.pem"), bundle).unwrap();
        if let Some(c) = client {
            std::fs::copy(self.cert(c), d.join("client-cert.pem")).unwrap();
            std::fs::copy(self.key(c), d.join("client-key.pem")).unwrap();
        }
        d
    }
}
