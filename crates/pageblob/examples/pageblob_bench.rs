//! Helper for `benches/pageblob-compare.sh`: writes through `PageWriter` to Azurite, and
//! prepares what the curl baseline needs.
//!
//! ```text
//! pageblob_bench write PORT CONTAINER BLOB SIZE_MIB IN_FLIGHT   time PageWriter (prints seconds)
//! pageblob_bench create PORT CONTAINER BLOB SIZE_MIB            create an empty page blob
//! pageblob_bench sas                                            print an account SAS query
//! pageblob_bench verify PORT CONTAINER BLOB FILE                compare the blob with FILE
//! pageblob_bench crc FILE                                       base64 CRC-64 of FILE (a header value)
//! ```

use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use lifeboat_pageblob::{
    AZURITE_ACCOUNT, AZURITE_KEY, AzureStore, Change, Credential, PageStore, PageWriter,
    WriterConfig,
};

type Err = Box<dyn std::error::Error>;

fn store(port: &str, container: &str) -> Result<AzureStore, Err> {
    let url = format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}/{container}");
    let cred = Credential::SharedKey {
        account: AZURITE_ACCOUNT.into(),
        key: AZURITE_KEY.into(),
    };
    Ok(AzureStore::new(&url, cred)?)
}

fn data(len: usize) -> Vec<u8> {
    lifeboat_source::SplitMix64::new(42).bytes(len)
}

#[tokio::main]
async fn main() -> Result<(), Err> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| {
        a.get(i)
            .cloned()
            .ok_or("missing argument (see the file's doc)")
    };
    match arg(0)?.as_str() {
        "sas" => println!(
            "{}",
            lifeboat_pageblob::account_sas(AZURITE_ACCOUNT, AZURITE_KEY, "2099-01-01T00:00:00Z")?
        ),
        "create" => {
            let s = store(&arg(1)?, &arg(2)?)?;
            s.ensure_container().await?;
            let size = arg(4)?.parse::<u64>()? << 20;
            s.create(&arg(3)?, size, 0, &Default::default()).await?;
        }
        "write" => {
            let s = store(&arg(1)?, &arg(2)?)?;
            s.ensure_container().await?;
            let blob = arg(3)?;
            let size = arg(4)?.parse::<u64>()? << 20;
            s.create(&blob, size, 0, &Default::default()).await?;
            let config = WriterConfig {
                in_flight: arg(5)?.parse()?,
                ..WriterConfig::default()
            };
            let w = PageWriter::new(Arc::new(s), blob, config);
            let bytes = Bytes::from(data(size as usize));
            let t = Instant::now();
            let report = w
                .apply_batch(
                    0,
                    vec![Change::Data {
                        offset: 0,
                        data: bytes,
                    }],
                    None,
                )
                .await?;
            println!(
                "{:.3} {} {}",
                t.elapsed().as_secs_f64(),
                report.put_requests,
                report.bytes_sent
            );
        }
        "verify" => {
            let s = store(&arg(1)?, &arg(2)?)?;
            let want = std::fs::read(arg(4)?)?;
            let got = s.read(&arg(3)?, None, 0, want.len() as u64).await?;
            if got[..] != want[..] {
                return Err("blob differs from the file".into());
            }
            println!("identical");
        }
        "crc" => {
            let d = std::fs::read(arg(1)?)?;
            let crc = lifeboat_pageblob::crc64(&d).to_le_bytes();
            println!("{}", base64::engine::general_purpose::STANDARD.encode(crc));
        }
        other => return Err(format!("unknown command {other}").into()),
    }
    Ok(())
}
