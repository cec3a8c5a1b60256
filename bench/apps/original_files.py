"""The original service's file endpoints (shared/ORIGINAL.md), as written, for W5 and W6.

`POST /uploadfile/` saves a multipart `file` into ./uploads (the harness runs this server in a
temp folder); `POST /downloadfile/` answers `{"filename": path}` with a `FileResponse` of that
path. Both are sync endpoints, as in the original. The original serves any path on the
machine; the harness only binds it to 127.0.0.1 and asks for its own temp file.
"""

import os
import shutil

from fastapi import FastAPI, File, UploadFile
from fastapi.responses import FileResponse

app = FastAPI()


@app.post("/uploadfile/")
def create_upload_file(file: UploadFile = File(...)) -> dict[str, str | None]:  # noqa: B008
    save_path = "uploads"
    os.makedirs(save_path, exist_ok=True)
    file_path = os.path.join(save_path, file.filename or "upload")
    with open(file_path, "wb") as file_object:
        shutil.copyfileobj(file.file, file_object)
    return {"filename": file.filename}


@app.post("/downloadfile/")
def read_item(arg_dict: dict[str, str]) -> FileResponse:
    filename = arg_dict.get("filename")
    return FileResponse(filename or "")
