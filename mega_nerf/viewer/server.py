"""The viser server: every browser gets its own render loop on its own camera, over the training cameras (frusta)
and a point cloud, with shared controls.

Controls: what to show (rgb, depth, or the cells overlay of a container), the appearance embedding (the nearest
camera's, as render_images chooses it, or one picked on a slider), whether to draw cameras and points, and a camera
path: "Add key pose" keeps the browser's current view, "Save path" writes the key poses as a pose file
(camera_path.POSE_FILE_FORMAT, 19 numbers a line at the first key's size) for `mega-nerf-render --path`, atomically
and only over a pose file outside any dataset (check_path_file, at start-up and again at each save).

The scene is our normalised DRB world as it is; viser's up direction is -x (altitude grows with -x).
"""
from __future__ import annotations

import errno
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import viser

from mega_nerf.camera_path import Pose, look_at, nearest_image, read_pose_file, write_pose_file
from mega_nerf.data.dataset import ImageMetadata, check_file_not_in_dataset
from mega_nerf.errors import UserError
from mega_nerf.io import check_output
from mega_nerf.preview import TRAIN, frustum_corners
from mega_nerf.viewer.camera import OVERLAYS, View, c2w_from_viser, full_size, lens
from mega_nerf.viewer.loop import RenderLoop, Shown
from mega_nerf.viewer.scene import JPEG_QUALITY, Scene, cell_colour

UP = (-1.0, 0.0, 0.0)  # normalised DRB: x points down
FRUSTUM_SIZE = 0.03  # frustum depth, as a share of the cameras' horizontal extent
PORT_TRIES = 1000  # viser tries the port asked for, then the 999 after it in turn while each is in use
LAST_PORT = 65535  # beyond it viser's next try is a traceback
BINARY_PROBE = 4096  # bytes read for a NUL before a file is read whole as a pose file (a container is no text)


class Viewer:
    """A running viser server over `scene`. cameras: the training images drawn as frusta; centres: (I, 3) every
    image's camera centre in appearance-index order, for the nearest appearance (None: no dataset); points:
    (P, 3) float32, (P, 3) uint8 RGB and the points' size (normalised units), or None; home: (3, 4) c2w a new
    browser starts at, looking at `target` (3,)."""

    def __init__(self, scene: Scene, cameras: list[ImageMetadata] | None, centres: np.ndarray | None,
                 points: tuple[np.ndarray, np.ndarray, float] | None, home: np.ndarray, target: np.ndarray,
                 host: str = "0.0.0.0", port: int = 7007, max_resolution: int = 1920, target_fps: float = 10.0,
                 path_file: str | Path = "viewer_path.txt", share: float | None = None,
                 refresh: float | None = None, stream: torch.cuda.Stream | None = None) -> None:
        self.scene, self.centres, self.home, self.target = scene, centres, home, target
        self.max_resolution, self.target_fps, self.path_file = max_resolution, target_fps, Path(path_file)
        self.share, self.refresh, self.stream = share, refresh, stream
        self.loops: dict[int, RenderLoop] = {}
        self.keys: list[View] = []
        self._lock = threading.Lock()
        self.server = viser.ViserServer(host=host, port=port, verbose=False)
        self.server.scene.set_up_direction(UP)
        self.cameras_node = self._add_cameras(cameras) if cameras else None
        self.points_node = self._add_points(*points) if points is not None and len(points[0]) else None
        self._add_controls()
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(self._disconnect)

    @property
    def url(self) -> str:
        """The page's address (localhost when serving on every interface)."""
        host = self.server.get_host()
        return f"http://{'localhost' if host == '0.0.0.0' else host}:{self.server.get_port()}"

    def close(self) -> None:
        """Stop every render loop and the server."""
        with self._lock:
            loops, self.loops = list(self.loops.values()), {}
        for loop in loops:
            loop.close()
        self.server.stop()

    # ---- scene ----------------------------------------------------------------------------------------------

    def _add_cameras(self, cameras: list[ImageMetadata]) -> viser.SceneNodeHandle:
        """Each camera as 8 line segments: centre to its image's corners, and the corners' rectangle."""
        centres = np.stack([m.c2w[:, 3].double().numpy() for m in cameras])
        extent = float(np.ptp(centres[:, 1:], axis=0).max()) or 1.0
        corners = np.stack([frustum_corners(m, FRUSTUM_SIZE * extent).numpy() for m in cameras])  # (N, 4, 3)
        spokes = np.stack([np.repeat(centres[:, None], 4, 1), corners], 2)  # (N, 4, 2, 3)
        rims = np.stack([corners, np.roll(corners, -1, 1)], 2)
        segments = np.concatenate([spokes, rims], 1).reshape(-1, 2, 3).astype(np.float32)
        return self.server.scene.add_line_segments("/cameras", segments, TRAIN[::-1], thickness=2.0,
                                                   thickness_units="screen")

    def _add_points(self, xyz: np.ndarray, rgb: np.ndarray, size: float) -> viser.SceneNodeHandle:
        return self.server.scene.add_point_cloud("/points", xyz.astype(np.float32), rgb, point_size=size,
                                                 point_shape="square", point_shading="flat")

    # ---- controls -------------------------------------------------------------------------------------------

    def _add_controls(self) -> None:
        gui = self.server.gui
        overlays = OVERLAYS if self.scene.cells else OVERLAYS[:2]
        self.overlay = gui.add_dropdown("Show", overlays, initial_value="rgb",
                                        hint="cells: each pixel tinted by the submodule that owns its surface")
        self.nearest = gui.add_checkbox("Nearest appearance", self.centres is not None,
                                        disabled=self.centres is None,
                                        hint="the appearance of the training image nearest to the camera")
        last = max(self.scene.n_images - 1, 1)
        self.appearance = gui.add_slider("Appearance", 0, last, 1, 0, disabled=self.centres is not None)
        self.show_cameras = gui.add_checkbox("Cameras", True, visible=self.cameras_node is not None)
        self.show_points = gui.add_checkbox("Points", True, visible=self.points_node is not None)
        if self.scene.cells:
            legend = ", ".join(f"<span style='color:rgb{cell_colour(c)}'>cell {c}</span>" for c in self.scene.cells)
            gui.add_html(f"<small>{legend}</small>")
        with gui.add_folder("Camera path"):
            self.add_key = gui.add_button("Add key pose")
            self.save_path = gui.add_button("Save path", hint=f"writes {self.path_file}")
            self.key_count = gui.add_markdown("no key poses")
        for handle in (self.overlay, self.nearest, self.appearance):
            handle.on_update(lambda _: self._resubmit())
        self.nearest.on_update(lambda _: setattr(self.appearance, "disabled", self.nearest.value))
        self.show_cameras.on_update(lambda _: self._set_visible(self.cameras_node, self.show_cameras.value))
        self.show_points.on_update(lambda _: self._set_visible(self.points_node, self.show_points.value))
        self.add_key.on_click(lambda event: self._add_key(event.client))
        self.save_path.on_click(lambda event: self._save_path(event.client))

    @staticmethod
    def _set_visible(node: viser.SceneNodeHandle | None, visible: bool) -> None:
        if node is not None:
            node.visible = visible

    def _add_key(self, client: viser.ClientHandle | None) -> None:
        if client is None:
            return
        with self._lock:
            self.keys.append(self.view_of(client))
            count = len(self.keys)
        self.key_count.content = f"{count} key pose{'s' if count > 1 else ''}"

    def _save_path(self, client: viser.ClientHandle | None) -> None:
        """Write the key poses (at least one) to path_file, all at the first key's size."""
        with self._lock:
            keys = list(self.keys)
        if not keys:
            if client is not None:
                client.add_notification("No key poses", "add at least one with 'Add key pose'",
                                        auto_close_seconds=5)
            return
        W, H = keys[0].width, keys[0].height
        try:
            check_path_file(self.path_file)  # again: what was checked at start-up may have been replaced since
            write_pose_file(self.path_file, [Pose(k.c2w, lens(k.fov, W, H), (W, H), k.appearance) for k in keys])
        except UserError as e:  # a refused write: said in the browser and the terminal, the server goes on
            title, message = "Camera path not saved", str(e)
        else:
            title = "Camera path saved"
            message = f"{len(keys)} key poses in {self.path_file}: render with mega-nerf-render --path {self.path_file}"
        print(message)
        if client is not None:
            client.add_notification(title, message, auto_close_seconds=10)

    # ---- clients --------------------------------------------------------------------------------------------

    def view_of(self, client: viser.ClientHandle) -> View:
        """The view a browser asks for now: its camera, its canvas at most max_resolution on the longer side,
        and the controls' appearance and overlay."""
        camera = client.camera
        c2w = c2w_from_viser(camera.wxyz, camera.position)
        W, H = full_size(camera.image_width, camera.image_height, self.max_resolution)
        if self.nearest.value and self.centres is not None:
            appearance = nearest_image(self.centres, c2w[:, 3])
        else:
            appearance = min(int(self.appearance.value), self.scene.n_images - 1)
        return View(c2w, float(camera.fov), W, H, appearance, self.overlay.value)

    def go_home(self, client: viser.ClientHandle) -> None:
        """Put the browser's camera at the home pose, looking at the target."""
        client.camera.up_direction = UP
        client.camera.position = self.home[:, 3]
        client.camera.look_at = self.target

    def _connect(self, client: viser.ClientHandle) -> None:
        """A new browser: put its camera at home, start its render loop and render on every camera change."""
        self.go_home(client)
        camera = client.camera

        def show(image: np.ndarray, shown: Shown) -> None:
            if client.client_id in self.server.get_clients():  # not a browser that left while this rendered
                client.scene.set_background_image(image, format="jpeg", jpeg_quality=JPEG_QUALITY[shown.final])

        loop = RenderLoop(self.scene, show, self.target_fps, self.share, self.refresh, self.stream)
        with self._lock:
            self.loops[client.client_id] = loop
        camera.on_update(lambda _: loop.submit(self.view_of(client)))
        loop.submit(self.view_of(client))

    def _disconnect(self, client: viser.ClientHandle) -> None:
        with self._lock:
            loop = self.loops.pop(client.client_id, None)
        if loop is not None:
            loop.close()

    def _resubmit(self) -> None:
        """The controls changed: every browser's view again."""
        clients = self.server.get_clients()
        with self._lock:
            loops = dict(self.loops)
        for client_id, loop in loops.items():
            if client_id in clients:
                loop.submit(self.view_of(clients[client_id]))


def is_pose_file(path: Path) -> bool:
    """Whether `path` is a pose file that camera_path.read_pose_file reads (any appearance index), the only kind
    of file "Save path" may replace. A file with a NUL in its first BINARY_PROBE bytes (a container, checkpoint,
    params.pt, PNG) is not one and is not read further."""
    try:
        with open(path, "rb") as f:
            if b"\0" in f.read(BINARY_PROBE):
                return False
        read_pose_file(path, sys.maxsize)
    except (OSError, UserError):
        return False
    return True


def check_path_file(path: str | Path, inputs: Mapping[str, Sequence[str | Path | None]] | None = None) -> None:
    """One-line UserError naming --path_file where "Save path" would destroy something or could not write: one
    of the command's `inputs` (option -> paths), a folder, an existing file that is not a pose file
    (is_pose_file: a config.yaml, a container), a path under a file, or a file in a dataset's folder or its
    train/ or val/ images."""
    check_output(path, "--path_file", inputs or {}, "a pose file", is_pose_file)
    check_file_not_in_dataset(path, "--path_file")
    folder = Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"--path_file {path}: {folder} is a file, not a folder; choose another path")


def check_address(host: str, port: int, port_option: str = "--port") -> None:
    """One-line UserError, before the server starts, for a --host this machine cannot serve on: a name that does
    not resolve, or an address of another machine (viser would try a thousand ports on it, printing nothing and
    never starting); for a --port that is no port number or that the user may not open; or for a port in use with
    no free one after it (viser takes the next free one, and past 65535 fails with a traceback). Each address the
    name resolves to is bound and closed, as the server's socket would be. `port_option` is the option that gave
    the port (train.py's --viewer), named in the messages."""
    if not 0 <= port < 65536:  # else the resolver blames the host, or the bind raises OverflowError
        raise UserError(f"{port_option} must be a port number (0: any free port), got {port}")
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not a host name or address this machine can resolve ({e.strerror})") from None
    for family, kind, protocol, _, address in addresses:
        error = bind_error(family, kind, protocol, address)
        if error is None:
            continue
        if error.errno == errno.EADDRINUSE:
            later = range(port + 1, min(port + PORT_TRIES, LAST_PORT + 1))
            if all(bind_error(family, kind, protocol, (address[0], p, *address[2:])) for p in later):
                raise UserError(f"{port_option} {port}: in use on {address[0]}, and no port after it is free to "
                                f"serve on instead; choose another {port_option} (0: any free port)")
            continue
        if error.errno in (errno.EACCES, errno.EPERM):
            raise UserError(f"{port_option} {port}: not allowed to serve on it ({error.strerror}; ports below 1024 "
                            "need root)")
        raise UserError(f"--host {host}: cannot serve on {address[0]}, not an address of this machine "
                        f"({error.strerror}; 0.0.0.0 serves on all of them)")


def bind_error(family: int, kind: int, protocol: int, address: tuple) -> OSError | None:
    """Why a server socket could not bind `address` now (the socket is closed at once), or None when it could."""
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server socket
        try:
            probe.bind(address)
        except OSError as e:
            return e
    return None


def home_pose(centres: np.ndarray | None, box: tuple[np.ndarray, np.ndarray], ground: float | None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Where a browser starts: (c2w (3, 4), target (3,)), looking at the centre of the cameras' horizontal extent
    on the ground from a reach above their mean altitude and 1.5 reaches to the side (reach: half the extent), so
    that the cameras and the scene are in view; without cameras, the same over the box (its top as altitude)."""
    lo, hi = (centres.min(0), centres.max(0)) if centres is not None else box
    middle = (lo + hi) / 2
    reach = max(float((hi - lo)[1:].max()) / 2, 1e-3)
    altitude = float(centres[:, 0].mean()) if centres is not None else float(lo[0])
    ground_x = ground if ground is not None else altitude + reach
    target = np.array([max(ground_x, altitude + 1e-3), middle[1], middle[2]])
    position = np.array([altitude - reach, middle[1], middle[2] + 1.5 * reach])
    return np.concatenate([look_at(position, target), position[:, None]], 1), target
